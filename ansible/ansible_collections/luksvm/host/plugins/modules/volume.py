#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: volume
short_description: One luksvm volume in /etc/luksvm/crypttab.d
version_added: "0.1.0"
description:
  - Writes one volume's line (crypttab syntax, see luksvm-crypttab(5)) into a fragment in
    C(/etc/luksvm/crypttab.d), validated first with C(luksvm config check) on a copy of the
    configuration, then runs C(luksvm apply) so that its units follow.
  - Never unlocks or locks a volume unless asked with I(state=unlocked) or I(state=locked).
  - Runs the C(luksvm) command line; it does not import luksvm.
options:
  name:
    description: The mapping name; the guest's disk is C(/dev/mapper/NAME).
    type: str
    required: true
  source:
    description:
      - The LUKS device, a path or C(UUID=), C(PARTUUID=), C(LABEL=), C(PARTLABEL=).
      - Required unless I(state=absent), or I(state=unlocked)/I(state=locked) for a volume
        already configured.
    type: str
  key:
    description:
      - A keyfile path, C(-) to ask for a passphrase, or C(keyring:SERVICE/USER).
    type: str
    default: "-"
  options:
    description: crypttab options such as C(luks), C(discard), C(noauto).
    type: list
    elements: str
    default: [luks]
  guests:
    description: The libvirt guests whose disk this volume is (C(x-luksvm.guest=)).
    type: list
    elements: str
    default: []
  file:
    description:
      - The fragment's file name in C(crypttab.d), ending in C(.conf). Other volumes in it are
        kept. Defaults to C(50-NAME.conf), or the file that already defines the volume.
    type: str
  state:
    description:
      - C(present) writes the line, C(absent) removes it (from whichever fragment defines it).
      - C(unlocked) and C(locked) also make sure of the line (when I(source) is given), then
        run C(luksvm unlock NAME) or C(luksvm lock NAME) when the volume is not so already.
    type: str
    choices: [present, absent, unlocked, locked]
    default: present
  apply:
    description: Run C(luksvm apply) after a change (and when units are not up to date).
    type: bool
    default: true
extends_documentation_fragment:
  - luksvm.host.common
notes:
  - Check mode writes nothing and runs C(luksvm apply --dry-run); diff mode shows the
    fragment before and after.
seealso:
  - name: luksvm-crypttab(5)
    description: The line format.
    link: https://github.com/luksvm/luksvm
author:
  - luksvm maintainers (@luksvm)
"""

EXAMPLES = r"""
- name: The mail server's disk, unlocked at boot with a keyfile
  luksvm.host.volume:
    name: cr_imap_encr
    source: /dev/volgrp4/lvimap_hd0
    key: /etc/luksvm/keys/imap.key
    options: [luks, discard]
    guests: [mail]

- name: Unlock a noauto volume now (its key is a keyfile, so nothing is asked)
  luksvm.host.volume:
    name: cr_web
    state: unlocked

- name: Remove a volume from the configuration
  luksvm.host.volume:
    name: cr_old
    state: absent
"""

RETURN = r"""
file:
  description: The fragment written (or that would be).
  returned: always
  type: str
  sample: /etc/luksvm/crypttab.d/50-cr_imap_encr.conf
line:
  description: The volume's crypttab line (absent when removed).
  returned: always
  type: str
  sample: cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
apply:
  description: What C(luksvm apply) printed (or would, in check mode).
  returned: always
  type: list
  elements: str
volume_state:
  description: C(unlocked) or C(locked) after the task, from C(luksvm status --json).
  returned: when state is unlocked or locked
  type: str
  sample: unlocked
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luksvm.host.plugins.module_utils.luksvm import (
    COMMON_ARGS,
    CRYPTTAB_DIR,
    MANAGED,
    Luksvm,
    apply_units,
    read,
    set_volume_line,
    volume_line,
    write,
)


def defined_in(config, name):
    for volume in config["volumes"]:
        if volume["name"] == name:
            return volume
    return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            source=dict(type="str"),
            key=dict(type="str", default="-", no_log=False),
            options=dict(type="list", elements="str", default=["luks"]),
            guests=dict(type="list", elements="str", default=[]),
            file=dict(type="str"),
            state=dict(type="str", default="present",
                       choices=["present", "absent", "unlocked", "locked"]),
            apply=dict(type="bool", default=True),
            **COMMON_ARGS
        ),
        required_if=[("state", "present", ["source"])],
        supports_check_mode=True,
    )
    p = module.params
    name, state = p["name"], p["state"]
    if p["file"] is not None and (not p["file"].endswith(".conf") or "/" in p["file"]):
        module.fail_json(msg="file=%r: give a file name ending in .conf (no directory), such as "
                             "50-%s.conf" % (p["file"], name))
    for guest in p["guests"]:
        if not guest or "," in guest or " " in guest:
            module.fail_json(msg="guests: %r is not a libvirt guest name" % guest)
    for option in p["options"]:
        if option.startswith("x-luksvm.guest="):
            module.fail_json(msg="options: give guests with guests:, not %r" % option)
    key = "-" if p["key"] in ("", "none") else p["key"]
    cli = Luksvm(module)
    config = cli.config()
    existing = defined_in(config, name)
    result = dict(changed=False, apply=[])

    if existing is not None:
        path = existing["defined_at"].rsplit(":", 2)[0]
        relative = os.path.relpath(path, cli.root)
    else:
        relative = os.path.join(CRYPTTAB_DIR, p["file"] or "50-%s.conf" % name)
        path = cli.path(relative)
    if p["file"] is not None and existing is not None and os.path.basename(path) != p["file"]:
        module.fail_json(msg="volume %s is defined at %s; remove it there first (state: absent) "
                             "or give file: %s" % (name, existing["defined_at"],
                                                   os.path.basename(path)))
    result["file"] = path

    if state == "absent":
        line = None
    elif p["source"] is None:
        if existing is None:
            module.fail_json(msg="volume %s is not configured; give source: to add it" % name)
        line = None  # keep the line as it is
    else:
        line = volume_line(name, p["source"], key, p["options"], p["guests"])
    wanted = existing is not None and p["source"] is not None and (
        existing["source"], existing["key"], existing["options"], existing["guests"]
    ) == (p["source"], key, p["options"], p["guests"])
    result["line"] = line

    before = read(path)
    if state == "absent" and existing is None:
        after = before
    elif line is None and state != "absent":
        after = before
    elif wanted:
        after = before
    else:
        after = set_volume_line(before, name, line)
    if after is not None and after != before and not after.replace(MANAGED, "").strip():
        after = None  # the fragment held only this volume: remove the file
    if after != before:
        result["changed"] = True
        if module._diff:
            result["diff"] = dict(before=before or "", after=after or "",
                                  before_header=path, after_header=path)
        cli.validate({relative: after})
        if not module.check_mode:
            if after is None:
                os.unlink(path)
            else:
                write(module, path, after)
    if p["apply"]:
        apply_units(cli, result)

    if state in ("unlocked", "locked"):
        volumes = cli.json(["status"], ok=(0, 2))[1]["volumes"]
        now = next((v["state"] for v in volumes if v["name"] == name), None)
        if now != state:
            result["changed"] = True
            if not module.check_mode:
                cli.run(["unlock" if state == "unlocked" else "lock", name])
                volumes = cli.json(["status"], ok=(0, 2))[1]["volumes"]
                now = next((v["state"] for v in volumes if v["name"] == name), None)
            else:
                now = state
        result["volume_state"] = now
    module.exit_json(**result)


if __name__ == "__main__":
    main()
