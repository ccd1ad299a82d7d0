#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: guest
short_description: Start or stop a luksvm guest, the way its units do
version_added: "0.1.0"
description:
  - I(state=started) runs C(luksvm start GUEST), which starts the guest only once all its
    volumes are unlocked and waits until it runs (through its unit when systemd runs).
  - I(state=stopped) runs C(luksvm stop GUEST), which requests an ACPI shutdown, waits up to the
    guest's stop_timeout and then applies its on_timeout policy (destroy, managedsave or fail)
    and returns once the guest is off.
  - The guest's state is read from C(luksvm status --json).
options:
  name:
    description: The guest (a libvirt domain named by a volume's C(x-luksvm.guest=)).
    type: str
    required: true
  state:
    description: What the guest should be.
    type: str
    choices: [started, stopped]
    default: started
extends_documentation_fragment:
  - luksvm.host.common
notes:
  - Check mode reports what would change and runs nothing.
author:
  - luksvm maintainers (@luksvm)
"""

EXAMPLES = r"""
- name: Stop the mail server before maintenance (waits, then its policy)
  luksvm.host.guest:
    name: mail
    state: stopped

- name: Start it again once its volumes are unlocked
  luksvm.host.guest:
    name: mail
"""

RETURN = r"""
guest_state:
  description: libvirt's state of the guest after the task (from C(luksvm status --json)).
  returned: always
  type: str
  sample: running
output:
  description: What luksvm printed.
  returned: when it ran
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luksvm.host.plugins.module_utils.luksvm import COMMON_ARGS, Luksvm


def guest_state(cli, name):
    status = cli.json(["status"], ok=(0, 2))[1]
    for guest in status["guests"]:
        if guest["name"] == name:
            if guest["state"] == "unknown":
                cli.module.fail_json(
                    msg="guest %s: libvirt's state is not known: %s"
                        % (name, "; ".join(status["problems"]) or "see luksvm status")
                )
            return guest
    cli.module.fail_json(
        msg="no luksvm guest %s: name it with x-luksvm.guest=%s on its volumes "
            "(luksvm.host.volume guests:)" % (name, name)
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="started", choices=["started", "stopped"]),
            **COMMON_ARGS
        ),
        supports_check_mode=True,
    )
    cli = Luksvm(module)
    name, state = module.params["name"], module.params["state"]
    guest = guest_state(cli, name)
    running = guest["state"] == "running"
    result = dict(changed=running != (state == "started"), guest_state=guest["state"])
    if result["changed"] and not module.check_mode:
        if state == "started" and not guest["may_start"]:
            module.fail_json(
                msg="guest %s may not start: its volumes %s are locked; unlock them first "
                    "(luksvm.host.volume state: unlocked)" % (name, ", ".join(guest["locked_volumes"])),
                **result
            )
        rc, out, err = cli.run(["start" if state == "started" else "stop", name])
        result["output"] = (out + err).splitlines()
        result["guest_state"] = guest_state(cli, name)["state"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
