#!/usr/bin/env python3
"""Renders every kustomize overlay under manifests/ and validates the result.

Kubernetes' own kinds are checked against the published Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors). Our kinds are checked against the
openAPIV3Schema of our generated CRDs (manifests/crds), with unknown fields refused too,
since the API server would prune them silently.

Usage: validate-manifests.py [--kubernetes-version 1.33.0] [OVERLAY...]
Exit status 0 when everything validates; each problem is printed as
`overlay: Kind namespace/name: message`.
"""

import argparse
import copy
import glob
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERLAYS = ["base", "demo", "observability"]


def crd_schemas():
    """(group, kind) -> JSON schema of every CRD under manifests/crds."""
    schemas = {}
    for path in glob.glob(os.path.join(ROOT, "manifests", "crds", "*.yaml")):
        with open(path) as f:
            crd = yaml.safe_load(f)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = to_json_schema(version["schema"]["openAPIV3Schema"])
            schemas[(spec["group"], version["name"], spec["names"]["kind"])] = schema
    return schemas


def to_json_schema(node):
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema: `nullable` becomes a null type,
    objects with properties refuse unknown ones, `x-kubernetes-*` extensions are dropped."""
    node = copy.deepcopy(node)
    if isinstance(node, dict):
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        for key in [k for k in node if k.startswith("x-kubernetes-")]:
            del node[key]
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if "properties" in node:
            node["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
            if "additionalProperties" not in node and not preserve:
                node["additionalProperties"] = False
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = to_json_schema(node["additionalProperties"])
        if "items" in node:
            node["items"] = to_json_schema(node["items"])
        node.pop("format", None)  # uint16 and friends are not JSON Schema formats
    return node


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", overlay if os.path.isabs(overlay) else os.path.join(ROOT, "manifests", overlay)],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{overlay}: kubectl kustomize failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def check(overlay, docs, schemas, version):
    problems = []
    for doc in docs:
        api_version = doc.get("apiVersion", "")
        kind = doc.get("kind", "")
        meta = doc.get("metadata", {})
        where = f"{overlay}: {kind} {meta.get('namespace', '')}/{meta.get('name', '')}"
        group, _, ver = api_version.rpartition("/")
        if group.endswith("ferrymesh.io"):
            schema = schemas.get((group, ver, kind))
            if schema is None:
                problems.append(f"{where}: no CRD for {api_version} {kind}")
                continue
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
            for error in jsonschema.Draft7Validator(schema).iter_errors(body):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.append(f"{where}: {path}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: no Kubernetes schema: {e}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default="1.33.0")
    parser.add_argument("overlays", nargs="*", default=OVERLAYS)
    args = parser.parse_args()
    schemas = crd_schemas()
    problems = []
    counts = []
    for overlay in args.overlays:
        docs = render(overlay)
        counts.append(f"{overlay}: {len(docs)} objects")
        problems += check(overlay, docs, schemas, args.kubernetes_version)
    for p in problems:
        print(p)
    print("; ".join(counts) + f"; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
