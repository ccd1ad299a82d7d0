# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)

from __future__ import annotations


class ModuleDocFragment:
    """The options every luksvm.host module has: where luksvm works and which luksvm runs."""

    DOCUMENTATION = r"""
options:
  root:
    description: The root directory luksvm works under (C(luksvm --root)); C(/) on a real host.
    type: path
    default: /
  executable:
    description: The luksvm command; found on C(PATH) when not given.
    type: path
"""
