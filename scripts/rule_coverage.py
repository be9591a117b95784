"""`python scripts/rule_coverage.py [path/to/file.py:function] [--args 'f32[8,3]']`: the same as
`bpkit rules` (see bpkit/check/coverage.py)."""
import sys

from bpkit.check.coverage import rules_command

if __name__ == "__main__":
    sys.exit(rules_command(sys.argv[1:]))
