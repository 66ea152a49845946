"""Loads every source named in a JSON file ({case: path}) with `import_source` and writes {case: [outcome, message]}
(outcome: loaded | UserError | crash). Run by test_corrupt_inputs.py in a subprocess under a memory limit, so
an input that makes the loader allocate a huge buffer shows up as a crash instead of taking the machine down.

    python load_worker.py cases.json outcomes.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(cases_file: str, out_file: str) -> None:
    from tscompile.errors import UserError
    from tscompile.importers import import_source
    out = {}
    for case, path in json.loads(Path(cases_file).read_text()).items():
        try:
            import_source(path)
            out[case] = ["loaded", ""]
        except UserError as e:
            out[case] = ["UserError", str(e)]
        except BaseException as e:  # noqa: BLE001 (MemoryError under the limit included: the test reports it)
            out[case] = ["crash", f"{type(e).__name__}: {e}"[:500]]
    Path(out_file).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
