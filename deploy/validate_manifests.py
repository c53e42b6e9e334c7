#!/usr/bin/env python3
"""Validate Kubernetes manifests offline and strictly: every object, or a non-zero exit.

    python deploy/validate_manifests.py [-k 1.29 -k 1.37] FILE.yaml ...

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields fail).
The prometheus-operator kinds (ServiceMonitor, PrometheusRule) are checked against their CRDs'
own schemas kept in deploy/schemas/ (see update_crd_schemas.py there), made strict the same way,
with ``metadata`` checked as Kubernetes' ObjectMeta; a PrometheusRule's expressions and ``for``
durations must also parse as PromQL (promql-parser). Unlike the kubernetes-validate command, a
kind with no schema is an error here, not a warning: nothing passes unchecked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "prometheusrule-monitoring-v1.json",
}
# Native sidecars (an init container with restartPolicy: Always) are on by default from 1.29.
DEFAULT_VERSIONS = ("1.29", "1.37")


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Return the non-empty YAML documents of a file."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def kubernetes_definitions(version: str) -> dict[str, Any]:
    """Return kubernetes-validate's strict ``_definitions.json`` for a Kubernetes version."""
    wanted = tuple(int(part) for part in version.split(".")[:2])
    shipped = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    candidates = []
    for folder in shipped.glob("v*-local-strict"):
        numbers = tuple(int(part) for part in folder.name[1:].split("-")[0].split(".")[:2])
        if numbers <= wanted:
            candidates.append((numbers, folder))
    if not candidates:
        raise SystemExit(f"kubernetes-validate has no schemas for Kubernetes {version}")
    folder = max(candidates)[1]
    definitions: dict[str, Any] = json.loads(
        (folder / "_definitions.json").read_text(encoding="utf-8")
    )
    return definitions


def validate_crd_object(doc: dict[str, Any], schema_path: Path, version: str) -> None:
    """Validate a custom resource against its CRD schema; raise jsonschema.ValidationError."""
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    registry: Registry[Any] = Registry().with_resources([
        (schema["$id"], Resource.from_contents(schema)),
        ("https://kubernetes.io/api/_definitions.json",
         Resource.from_contents(kubernetes_definitions(version))),
    ])
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


class PromQLError(Exception):
    """A rule's expression or duration does not parse."""


def check_promql(doc: dict[str, Any]) -> None:
    """Parse every rule's ``expr`` and ``for``; raise PromQLError naming the first bad one."""
    for group in (doc.get("spec") or {}).get("groups") or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record") or "?"
            try:
                promql_parser.parse(str(rule["expr"]))
                if "for" in rule:
                    promql_parser.parse_duration(str(rule["for"]))
            except ValueError as exc:
                raise PromQLError(f"rule {group.get('name')}/{name}: {exc}") from None


def name_of(doc: dict[str, Any]) -> str:
    """Return ``kind/name`` for messages."""
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def check(doc: dict[str, Any], version: str) -> str | None:
    """Return an error message, or None when the object is valid for that version."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    try:
        if key in CRD_SCHEMAS:
            validate_crd_object(doc, CRD_SCHEMAS[key], version)
            if key[1] == "PrometheusRule":
                check_promql(doc)
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    except (ValidationError, jsonschema.ValidationError) as exc:
        where = ".".join(str(part) for part in exc.path) or "(top)"
        return f"{where}: {exc.message}"
    except PromQLError as exc:
        return str(exc)
    except SchemaNotFoundError as exc:
        return f"no schema for {key[1]} {key[0]} (Kubernetes {version}): {exc.message}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Validate every object of every file against every requested Kubernetes version."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions",
                        help=f"repeatable; default {' and '.join(DEFAULT_VERSIONS)}")
    args = parser.parse_args(argv)
    versions = args.versions or list(DEFAULT_VERSIONS)
    failures = checked = 0
    for path in args.files:
        docs = load_documents(path)
        if not docs:
            print(f"FAIL {path}: no objects")
            failures += 1
        for doc in docs:
            for version in versions:
                checked += 1
                error = check(doc, version)
                how = "CRD schema" if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS \
                    else "kubernetes-validate --strict"
                if error:
                    failures += 1
                    print(f"FAIL {path} {name_of(doc)} [{version}, {how}]: {error}")
                else:
                    print(f"ok   {path} {name_of(doc)} [{version}, {how}]")
    print(f"schemas: {checked - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
