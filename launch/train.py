"""``python -m launch.train ...`` (what ``ray job submit`` runs) is ``dldkd train ...``."""
import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
