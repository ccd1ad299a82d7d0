#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: header_backup
short_description: Back up LUKS headers now and say where the backups are
version_added: "0.1.0"
description:
  - Runs C(luksvm header-backup --json) for the named volumes (all when none are named) and
    returns each volume's newest backup with its SHA-256, so that a playbook can
    M(ansible.builtin.fetch) it off the host (a header backup on the same disk dies with the
    disk).
  - A backup is written only when the header changed since the newest one (luksvm's rule);
    the task is changed when one was written.
options:
  names:
    description: The volumes; all configured volumes when empty.
    type: list
    elements: str
    default: []
extends_documentation_fragment:
  - luksvm.host.common
notes:
  - Check mode runs C(luksvm header-backup --dry-run) and writes nothing.
author:
  - luksvm maintainers (@luksvm)
"""

EXAMPLES = r"""
- name: Back up every header
  luksvm.host.header_backup:
  register: headers

- name: Keep a copy on the controller
  ansible.builtin.fetch:
    src: "{{ item.file }}"
    dest: "backups/{{ inventory_hostname }}/{{ item.volume }}/"
    flat: true
    validate_checksum: true
  loop: "{{ headers.backups }}"
"""

RETURN = r"""
backup_dir:
  description: luksvm's C([backup] dir).
  returned: always
  type: str
  sample: /var/lib/luksvm/header-backups
backups:
  description: Each volume's newest backup.
  returned: always
  type: list
  elements: dict
  contains:
    volume:
      description: The volume.
      type: str
      returned: always
    file:
      description: The backup file (on the host).
      type: str
      returned: always
    sha256:
      description: The backup file's SHA-256 (null in check mode when it would be written).
      type: str
      returned: always
    uuid:
      description: The LUKS UUID of the header.
      type: str
      returned: always
    changed:
      description: Whether this run wrote it.
      type: bool
      returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luksvm.host.plugins.module_utils.luksvm import COMMON_ARGS, Luksvm


def main():
    module = AnsibleModule(
        argument_spec=dict(names=dict(type="list", elements="str", default=[]), **COMMON_ARGS),
        supports_check_mode=True,
    )
    cli = Luksvm(module)
    args = ["header-backup"] + (["--dry-run"] if module.check_mode else []) + module.params["names"]
    rc, report = cli.json(args, ok=(0, 2))
    failed = [v for v in report["volumes"] if v.get("error")]
    backups = []
    for v in report["volumes"]:
        if v.get("error"):
            continue
        real = v["file"] and not (module.check_mode and v["changed"])
        backups.append(dict(
            volume=v["volume"],
            file=v["file"],
            sha256=module.sha256(v["file"]) if real else None,
            uuid=v["uuid"],
            changed=bool(v["changed"]),
        ))
    result = dict(
        changed=any(b["changed"] for b in backups),
        backup_dir=report["backup_dir"],
        backups=backups,
    )
    if failed:
        module.fail_json(
            msg="header backup failed: " + "; ".join(v["error"] for v in failed), **result
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
