#!/usr/bin/env python
"""Rebuild the default template bank (same as ``inbrainsyn bank build``).

    python tools/build_default_bank.py [--out Resources/bank/default] [--spacing 1.5]
    python tools/build_default_bank.py --midpoints-only [--out Resources/bank/default]

``--midpoints-only`` adds (or redoes) the ``ageing_midpoints`` and ``conversion_svfs`` of an existing bank
without touching its templates, labels, mask or stored pieces (``default_bank.add_ageing_midpoints``,
``add_conversion_svfs``; about 3 min).

Needs nilearn (MNI152 2009a maps) and the AAL atlas of Debian's mricron-data unpacked at
/tmp/mricron (``apt-get download mricron-data && dpkg-deb -x mricron-data_*.deb /tmp/mricron``).
See docs/templates.md.
"""

from __future__ import annotations

import sys

from inbrainsyn.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    out = "Resources/bank/default"
    if "--out" in args:
        i = args.index("--out")
        out = args[i + 1]
        del args[i:i + 2]
    if "--midpoints-only" in args:
        from inbrainsyn.templates.default_bank import add_ageing_midpoints, add_conversion_svfs

        add_ageing_midpoints(out)
        add_conversion_svfs(out)
        sys.exit(0)
    sys.exit(main(["bank", "build", "-o", out, "--overwrite", *args]))
