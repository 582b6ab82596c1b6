"""Run se-deploy from a checkout: ``python cli.py COMMAND ...`` (same as the ``se-deploy`` script)."""

from se_deploy.cli import main

if __name__ == "__main__":
    main()
