#!/usr/bin/python3 -I
"""/usr/bin/luksvm as the RPM installs it: runs the luksvm package kept in ../lib/luksvm (that is
/usr/lib/luksvm) with the system's own Python, whatever its version. -I: neither the user's
site-packages nor PYTHON* variables nor the current directory can change what runs as root."""

from __future__ import annotations

import os
import sys

# Nothing written next to the package files at run time: the RPM's %post compiles the bytecode
# for this host's Python (and %preun removes it); a run only reads it.
sys.dont_write_bytecode = True
PREFIX = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.join(PREFIX, "lib", "luksvm"))

from luksvm.cli import main  # noqa: E402

sys.exit(main())
