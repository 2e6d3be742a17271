"""`python -m mmagent ...` = the `mmagent` command (what `accelerate launch -m mmagent train ...` starts)."""
from mmagent.cli import main

main()
