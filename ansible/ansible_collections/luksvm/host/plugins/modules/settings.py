#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: settings
short_description: Settings in /etc/luksvm/luksvm.conf
version_added: "0.1.0"
description:
  - Sets (or removes) settings in luksvm.conf, sections and keys as luksvm.conf(5) documents
    them (C([guests] stop_timeout), C([guest:NAME] on_timeout), C([backup] max_age), ...).
    Other lines and comments are kept.
  - The file as it would be is checked with C(luksvm config check) on a copy first; then
    C(luksvm apply) runs, since settings such as stop_timeout shape the units.
options:
  settings:
    description:
      - "C({section: {key: value}}); a value of C(null) removes the key (back to its default)."
      - Values are written as given; luksvm checks them.
    type: dict
    required: true
  apply:
    description: Run C(luksvm apply) after a change (and when units are not up to date).
    type: bool
    default: true
extends_documentation_fragment:
  - luksvm.host.common
notes:
  - Check mode writes nothing; diff mode shows luksvm.conf before and after.
author:
  - luksvm maintainers (@luksvm)
"""

EXAMPLES = r"""
- name: Give guests five minutes to shut down, save the slow one instead of destroying it
  luksvm.host.settings:
    settings:
      guests:
        stop_timeout: 5min
      "guest:db":
        on_timeout: managedsave
      backup:
        max_age: 14d
"""

RETURN = r"""
file:
  description: The settings file.
  returned: always
  type: str
  sample: /etc/luksvm/luksvm.conf
settings:
  description: "The uncommented settings after the task, as C({section: {key: value}})."
  returned: always
  type: dict
apply:
  description: What C(luksvm apply) printed (or would, in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luksvm.host.plugins.module_utils.luksvm import (
    COMMON_ARGS,
    SETTINGS_FILE,
    Luksvm,
    apply_units,
    get_settings,
    read,
    set_settings,
    write,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            settings=dict(type="dict", required=True),
            apply=dict(type="bool", default=True),
            **COMMON_ARGS
        ),
        supports_check_mode=True,
    )
    wanted = {}
    for section, values in module.params["settings"].items():
        if not isinstance(values, dict):
            module.fail_json(msg="settings.%s: give a mapping of keys to values, such as "
                                 "{stop_timeout: 5min}" % section)
        wanted[str(section)] = dict(
            (str(k), None if v is None else (str(v).lower() if isinstance(v, bool) else str(v)))
            for k, v in values.items()
        )
    cli = Luksvm(module)
    path = cli.path(SETTINGS_FILE)
    before = read(path)
    after = set_settings(before, wanted)
    result = dict(changed=False, file=path, apply=[])
    if after != (before or ""):
        if get_settings(after) != get_settings(before) or before is None:
            result["changed"] = True
    if result["changed"]:
        if module._diff:
            result["diff"] = dict(before=before or "", after=after, before_header=path,
                                  after_header=path)
        cli.validate({SETTINGS_FILE: after})
        if not module.check_mode:
            write(module, path, after)
    result["settings"] = get_settings(after if result["changed"] else before)
    if module.params["apply"]:
        apply_units(cli, result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
