"""Parity table for bpkit/rules/conv.py (conv_general_dilated), row for row."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bpkit
from tests.rules.harness import Case, args, parametrize, assert_case_parity, uniform


def conv(x_shape, w_shape, name, **kw):
    """A case ``lax.conv_general_dilated(x, w, **kw)`` differentiated in both operands."""
    kw.setdefault("window_strides", (1,) * (len(x_shape) - 2))
    kw.setdefault("padding", "VALID")
    return Case(name, lambda x, w: lax.conv_general_dilated(x, w, **kw),
                args(uniform(*x_shape), uniform(*w_shape)), argnums=(0, 1))


NHWC = ("NHWC", "HWIO", "NHWC")

CASES = [
    # 1-D
    conv((2, 3, 7), (4, 3, 3), "conv1d_nch"),
    conv((2, 7, 3), (3, 3, 4), "conv1d_nwc_stride2_asymmetric_pad", window_strides=(2,),
         padding=((2, 1),), dimension_numbers=("NWC", "WIO", "NWC")),
    # 2-D layouts and padding
    conv((2, 3, 5, 5), (4, 3, 3, 3), "conv2d_nchw_valid"),
    conv((2, 3, 5, 5), (4, 3, 3, 3), "conv2d_nchw_same_stride2", window_strides=(2, 2),
         padding="SAME"),
    conv((2, 5, 5, 3), (3, 3, 3, 4), "conv2d_nhwc_same", padding="SAME", dimension_numbers=NHWC),
    conv((2, 6, 5, 3), (3, 2, 3, 4), "conv2d_nhwc_valid_stride2_unused_tail",
         window_strides=(2, 2), dimension_numbers=NHWC),
    conv((2, 3, 5, 5), (4, 3, 3, 2), "conv2d_asymmetric_pad", window_strides=(1, 2),
         padding=((1, 0), (2, 1))),
    conv((2, 3, 5, 4), (2, 3, 2, 2), "conv2d_pad_wider_than_window", padding=((3, 0), (0, 2))),
    conv((2, 3, 6, 5), (2, 3, 3, 2), "conv2d_negative_pad", padding=((-1, 0), (1, -1))),
    conv((5, 2, 3, 4), (3, 2, 3, 4), "conv2d_exotic_layout", window_strides=(2, 1),
         padding="SAME", dimension_numbers=("HNWC", "OHWI", "WHCN")),
    # dilations
    conv((2, 3, 7, 6), (4, 3, 3, 2), "conv2d_rhs_dilation", rhs_dilation=(2, 3),
         padding=((1, 1), (0, 2))),
    conv((2, 3, 4, 4), (4, 3, 3, 3), "conv2d_lhs_dilation", lhs_dilation=(2, 2),
         padding=((1, 1), (2, 1))),
    conv((2, 3, 4, 5), (2, 3, 3, 2), "conv2d_all_dilations_strided", window_strides=(2, 1),
         lhs_dilation=(2, 1), rhs_dilation=(1, 2), padding=((2, 0), (1, 2))),
    Case("conv_transpose_nhwc_same_stride2",
         lambda x, w: lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=NHWC),
         args(uniform(2, 3, 3, 4), uniform(3, 3, 4, 2)), argnums=(0, 1)),
    Case("conv_transpose_valid_transpose_kernel",
         lambda x, w: lax.conv_transpose(x, w, (2, 1), "VALID", transpose_kernel=True,
                                         dimension_numbers=("NCHW", "OIHW", "NCHW")),
         args(uniform(2, 4, 3, 3), uniform(4, 2, 3, 2)), argnums=(0, 1)),
    # groups
    conv((2, 4, 5, 5), (6, 2, 3, 3), "conv2d_feature_groups_2", feature_group_count=2,
         window_strides=(2, 1), padding="SAME"),
    conv((2, 5, 5, 3), (3, 3, 1, 3), "conv2d_depthwise_nhwc", feature_group_count=3,
         padding="SAME", dimension_numbers=NHWC),
    conv((2, 5, 5, 2), (3, 3, 1, 4), "conv2d_depthwise_multiplier_2", feature_group_count=2,
         window_strides=(2, 2), padding=((1, 0), (0, 1)), dimension_numbers=NHWC),
    conv((4, 3, 5, 5), (4, 3, 3, 3), "conv2d_batch_groups_2", batch_group_count=2),
    conv((4, 5, 5, 3), (3, 2, 3, 4), "conv2d_batch_groups_2_nhwc_strided", batch_group_count=2,
         window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 2), dimension_numbers=NHWC),
    # 3-D
    conv((2, 2, 4, 4, 4), (3, 2, 2, 2, 2), "conv3d_ncdhw_same_strided", window_strides=(1, 2, 1),
         padding="SAME"),
    conv((2, 4, 3, 4, 4), (2, 2, 2, 2, 4), "conv3d_ndhwc_groups_dilated", feature_group_count=2,
         rhs_dilation=(1, 2, 1), padding=((1, 0), (0, 1), (1, 1)),
         dimension_numbers=("NDHWC", "DHWIO", "NDHWC")),
    # precision and output dtype
    conv((2, 3, 5, 5), (4, 3, 3, 3), "conv2d_precision_highest", padding="SAME",
         precision=lax.Precision.HIGHEST),
    Case("conv2d_preferred_element_type_f64",
         lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                               preferred_element_type=jnp.float64),
         args(uniform(2, 3, 5, 5), uniform(4, 3, 3, 3)), argnums=(0, 1), dtypes=("float32",)),
    # zero-size operands (JAX's grid has an empty spatial input dimension)
    conv((2, 2, 0, 4), (3, 2, 1, 2), "conv2d_empty_input_dim_padded_lhs_dilated",
         padding=((1, 0), (0, 1)), lhs_dilation=(2, 1)),
    conv((0, 2, 4, 4), (3, 2, 2, 2), "conv2d_empty_batch"),
    conv((2, 2, 4, 4), (0, 2, 2, 2), "conv2d_no_output_features"),
]


@parametrize(CASES)
def test_conv(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


def test_conv_second_order():
    """The rule is built from convolutions, so bpkit differentiates its own backward pass."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 3, 5, 5)))
    w = jnp.asarray(rng.uniform(-1, 1, (4, 3, 3, 3)))

    def loss(x, w):
        y = lax.conv_general_dilated(x, w, (2, 1), ((1, 0), (1, 1)), rhs_dilation=(1, 2))
        return jnp.sum(jnp.tanh(y))

    def gnorm(grad):
        return lambda x, w: sum(jnp.sum(g * g) for g in grad(loss, (0, 1))(x, w))

    got = bpkit.grad(gnorm(bpkit.grad), (0, 1))(x, w)
    want = jax.grad(gnorm(jax.grad), (0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
