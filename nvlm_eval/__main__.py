"""`python -m nvlm_eval`: the `nvlm-eval` command."""

from nvlm_eval.cli import main

main()
