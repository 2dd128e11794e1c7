"""``python -m launch.sweep ...`` (what ``ray job submit`` runs) is ``dldkd sweep ...``."""
import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
