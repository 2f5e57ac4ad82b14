"""nacctl, the operator's command line for NAC; the console script is nac_cli.main:main."""
