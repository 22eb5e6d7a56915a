"""Regenerate tests/fixtures/presets_resolved.json: the resolved config of every shipped preset.

    python tools/make_presets_fixture.py

For each ``configs/<name>.yaml`` the file stores ``config_to_dict(resolve_config(['--config', path]))`` (parser
defaults under the preset, no command-line flags; the ``config`` path itself is left out), keyed by the file
name. tests/unit/test_config.py checks that every preset still resolves to exactly these values (same keys, values
and types), so a preset can be shortened or reformatted without changing what a run gets. Regenerate only when
a preset's resolved values are meant to change, and review the diff.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.config import config_to_dict, resolve_config  # noqa: E402

CONFIGS = os.path.join(ROOT, 'configs')
OUT = os.path.join(ROOT, 'tests', 'fixtures', 'presets_resolved.json')


def resolved_presets() -> dict[str, dict]:
    """{preset file name: resolved config dict} for every configs/*.yaml, in name order."""
    out = {}
    for name in sorted(f for f in os.listdir(CONFIGS) if f.endswith('.yaml')):
        out[name] = config_to_dict(resolve_config(['--config', os.path.join(CONFIGS, name)]))
    return out


def main() -> None:
    data = resolved_presets()
    with open(OUT, 'w', encoding='utf8') as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write('\n')
    print(f"wrote {OUT} ({len(data)} presets)")


if __name__ == '__main__':
    main()
