"""Write nac_server/lua/_vocabulary.lua from nac_server/vocabulary.py.

Usage: python scripts/gen_vocabulary.py [--check]

--check fails, changing nothing, when the committed Lua file differs from what would be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nac_server.vocabulary import lua_source  # noqa: E402

TARGET = ROOT / "nac_server" / "lua" / "_vocabulary.lua"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the Lua file is stale")
    check = parser.parse_args().check
    wanted = lua_source()
    if check:
        if not TARGET.exists() or TARGET.read_text() != wanted:
            print(f"{TARGET.relative_to(ROOT)} is stale: run scripts/gen_vocabulary.py")
            return 1
        print("Lua vocabulary is current")
        return 0
    TARGET.write_text(wanted)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
