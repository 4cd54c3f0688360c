"""Extract the openAPIV3Schema of one CRD version into a JSON file for tests/deploy.

    python tests/deploy/schemas/vendor_crds.py CRD.yaml VERSION SOURCE OUT.json

SOURCE says where the CRD came from (repository, tag, commit, path). Descriptions are dropped
(they are most of the bytes and no validator reads them); everything else is kept as published.
The tests turn the structural schema into a closed JSON Schema when they load it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def extract(crd_file: Path, version: str, source: str) -> dict[str, Any]:
    (crd,) = [d for d in yaml.safe_load_all(crd_file.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
    spec = crd["spec"]
    (entry,) = [v for v in spec["versions"] if v["name"] == version]
    return {
        "source": source,
        "apiVersion": f"{spec['group']}/{version}",
        "kind": spec["names"]["kind"],
        "openAPIV3Schema": strip_descriptions(entry["schema"]["openAPIV3Schema"]),
    }


def main(argv: list[str]) -> int:
    crd_file, version, source, out = argv
    Path(out).write_text(json.dumps(extract(Path(crd_file), version, source), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
