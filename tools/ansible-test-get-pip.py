"""Stands in for the get-pip.py bootstrap script that ansible-test downloads from
ci-files.testing.ansible.com (not reachable here): pip from the venv's own ensurepip, then the
packages ansible-test asks for, from the package index pip is configured with. tools/install-deps
saves it where ansible-test looks (~/.ansible/test/cache/get_pip_21_3_1.py; 21.3.1 is the pip
of ansible-core 2.14)."""

import ensurepip
import subprocess
import sys

ensurepip.bootstrap()
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *sys.argv[1:]]))
