#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: info
short_description: luksvm's view of the host as facts
version_added: "0.1.0"
description:
  - Gathers C(luksvm config check --json), C(luksvm status --json), C(luksvm doctor --json)
    and, where this luksvm has it, C(luksvm keys --json), into C(ansible_facts.luksvm).
  - Changes nothing.
options:
  doctor:
    description: Run luksvm doctor (the slowest part).
    type: bool
    default: true
extends_documentation_fragment:
  - luksvm.host.common
notes:
  - Supports check mode (it never changes anything).
author:
  - luksvm maintainers (@luksvm)
"""

EXAMPLES = r"""
- name: Read luksvm's state
  luksvm.host.info:

- name: Every doctor failure on the host
  ansible.builtin.debug:
    msg: "{{ ansible_facts.luksvm.doctor | selectattr('status', 'equalto', 'FAIL') | list }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts to add to ansible_facts.
  returned: always
  type: complex
  contains:
    luksvm:
      description: luksvm's view of the host.
      type: complex
      returned: always
      contains:
        version:
          description: luksvm's version (C(luksvm --version)).
          type: str
          returned: always
          sample: "0.1.0"
        config:
          description: C(luksvm config check --json) (volumes, guests, files).
          type: dict
          returned: always
        status:
          description: C(luksvm status --json) (volumes locked or unlocked, guests' states).
          type: dict
          returned: always
        doctor:
          description: C(luksvm doctor --json) findings (check, status, subject, message, fix).
          type: list
          elements: dict
          returned: when doctor is true
        doctor_exit:
          description: doctor's exit status (0 ok, 1 warnings, 2 failures).
          type: int
          returned: when doctor is true
        keys:
          description: C(luksvm keys --json); null where this luksvm has no keys command.
          type: raw
          returned: always
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luksvm.host.plugins.module_utils.luksvm import COMMON_ARGS, Luksvm


def main():
    module = AnsibleModule(
        argument_spec=dict(doctor=dict(type="bool", default=True), **COMMON_ARGS),
        supports_check_mode=True,
    )
    cli = Luksvm(module)
    facts = dict(version=cli.run(["--version"])[1].split()[-1], config=cli.config())
    facts["status"] = cli.json(["status"], ok=(0, 2))[1]
    if module.params["doctor"]:
        facts["doctor_exit"], facts["doctor"] = cli.json(["doctor"], ok=(0, 1, 2))
    # A luksvm without the keys command exits 64 (usage); any other failure fails the task.
    rc, out, err = cli.run(["keys", "--json"], ok=(0, 1, 2, 64))
    facts["keys"] = None
    if rc == 64 and "invalid choice: 'keys'" not in err:
        module.fail_json(msg="luksvm keys --json failed (exit 64): %s" % err.strip(), stderr=err)
    if rc != 64:
        try:
            facts["keys"] = json.loads(out)
        except ValueError:
            module.fail_json(msg="luksvm keys --json printed no JSON", stdout=out, stderr=err)
    module.exit_json(changed=False, ansible_facts=dict(luksvm=facts))


if __name__ == "__main__":
    main()
