"""Named training sources beyond files on disk: the installed packages' Python sources, by license.

`--data` accepts, besides files, directories and globs:
- `stdlib`: the standard library's .py files (train/data.py);
- `code`: stdlib plus the .py files of every installed distribution whose license is permissive (MIT, BSD, Apache,
  PSF, ISC), except the held-out packages and a few that are mostly generated code (EXCLUDED);
- `site:NAME`: one installed distribution's .py files (any license: the caller chose it);
- `heldout-packages`: the distributions in HELDOUT_PACKAGES, never part of `code`, for evaluation.

Package documents are named `site/<distribution>/<path in site-packages>`, stdlib ones keep their path under the
stdlib root, so the hash split of stdlib files (and its held-out set) is the same whatever else is trained on.
What `code` holds on this machine: `dsv3 train --list-sources`.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import zlib
from dataclasses import dataclass

CODE = "code"
HELDOUT = "heldout-packages"
SITE_PREFIX = "site:"

# Never trained on by `code`: evaluated as code from packages the model has not seen (permissive, small, plain).
HELDOUT_PACKAGES = ("click", "h11", "jmespath", "pyparsing")
# Mostly generated or data-like sources (API models, rule tables, service stubs), or this project itself.
EXCLUDED = ("dsv3", "openai", "cfn-lint", "moto", "botocore", "awscli", "aws-sam-translator", "boto3")
MAX_FILE_BYTES = 400_000  # larger .py files are generated tables, not code a person wrote
# `code` takes at most this much of one distribution (files in a fixed hash order), so a few huge packages (torch,
# transformers, sympy) do not crowd out the many small ones; site:NAME takes all of it.
MAX_PACKAGE_BYTES = 2_000_000

_PERMISSIVE = re.compile(r"\b(MIT|BSD|0BSD|Apache|PSF|Python Software Foundation|ISC)\b", re.I)
_COPYLEFT = re.compile(r"\b(GPL|LGPL|AGPL|MPL|Mozilla|EUPL|CDDL|proprietary|commercial|UNKNOWN)\b", re.I)


@dataclass(frozen=True)
class Package:
    name: str  # the distribution's name as its metadata spells it
    version: str
    license: str  # SPDX expression or the license classifiers, shortened
    files: tuple[tuple[str, str], ...]  # (absolute path, path relative to its install root), .py only
    bytes: int

    @property
    def permissive(self) -> bool:
        return bool(_PERMISSIVE.search(self.license)) and not _COPYLEFT.search(self.license)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def license_of(dist: md.Distribution) -> str:
    """The distribution's license as one short string: License-Expression, else a short License field, else the
    license classifiers' last parts ('MIT License'), else 'UNKNOWN'."""
    meta = dist.metadata
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return expr
    field = (meta.get("License") or "").strip()
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License")]
    if classifiers:
        return " / ".join(classifiers)
    if field and len(field) <= 60 and "\n" not in field:
        return field
    return "UNKNOWN"


def _python_files(dist: md.Distribution) -> tuple[tuple[str, str], ...]:
    out = []
    for f in dist.files or ():
        rel = str(f).replace(os.sep, "/")
        if not rel.endswith(".py") or "__pycache__" in rel or rel.startswith(".."):
            continue  # '..' entries are scripts installed outside site-packages
        path = os.path.abspath(str(dist.locate_file(f)))
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if 0 < size <= MAX_FILE_BYTES:
            out.append((path, rel))
    return tuple(sorted(out, key=lambda t: t[1]))


def installed_packages() -> list[Package]:
    """Every installed distribution with .py files, one entry per name (the first on sys.path wins), by name."""
    seen: dict[str, Package] = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name")
        if not name or _norm(name) in seen:
            continue
        files = _python_files(dist)
        if not files:
            continue
        size = sum(os.path.getsize(p) for p, _ in files)
        seen[_norm(name)] = Package(name, dist.version, license_of(dist), files, size)
    return sorted(seen.values(), key=lambda p: _norm(p.name))


def role_of(pkg: Package) -> str:
    """'train' (part of `code`), 'heldout', or why it is left out."""
    n = _norm(pkg.name)
    if n in {_norm(h) for h in HELDOUT_PACKAGES}:
        return "heldout"
    if n in {_norm(e) for e in EXCLUDED}:
        return "excluded (generated or data-like)"
    if not pkg.permissive:
        return "excluded (license)"
    return "train"


def package_docs(pkg: Package, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """[(absolute path, document name)] for one package: names are site/<distribution>/<path>. With max_bytes,
    files are taken in the order of a hash of their names until the next one would pass the budget."""
    docs = [(p, f"site/{pkg.name}/{rel}") for p, rel in pkg.files]
    if max_bytes is None or pkg.bytes <= max_bytes:
        return docs
    kept, total = [], 0
    for p, name in sorted(docs, key=lambda d: zlib.crc32(d[1].encode("utf-8"))):
        size = os.path.getsize(p)
        if total + size > max_bytes:
            continue
        kept.append((p, name))
        total += size
    return sorted(kept, key=lambda d: d[1])


def resolve(spec: str) -> list[tuple[str, str]] | None:
    """A named source -> [(absolute path, document name)] without the stdlib part (`code` adds it in data.py), or
    None when `spec` is not a named source (then it is a file, directory or glob)."""
    if spec == CODE:
        return [d for p in installed_packages() if role_of(p) == "train" for d in package_docs(p, MAX_PACKAGE_BYTES)]
    if spec == HELDOUT:
        pkgs = {_norm(p.name): p for p in installed_packages()}
        missing = [h for h in HELDOUT_PACKAGES if _norm(h) not in pkgs]
        if len(missing) == len(HELDOUT_PACKAGES):
            raise ValueError(f"none of the held-out packages ({', '.join(HELDOUT_PACKAGES)}) is installed: "
                             f"pip install {' '.join(HELDOUT_PACKAGES)}")
        return [d for h in HELDOUT_PACKAGES if _norm(h) in pkgs for d in package_docs(pkgs[_norm(h)])]
    if spec.startswith(SITE_PREFIX):
        name = spec[len(SITE_PREFIX):]
        pkgs = {_norm(p.name): p for p in installed_packages()}
        if _norm(name) not in pkgs:
            close = [p.name for n, p in pkgs.items() if _norm(name)[:3] in n][:5]
            hint = f" (installed ones with similar names: {', '.join(close)})" if close else ""
            raise ValueError(f"--data {spec}: no installed distribution named {name!r} has .py files{hint}; "
                             f"`dsv3 train --list-sources` lists them")
        return package_docs(pkgs[_norm(name)])
    return None


def sources_table() -> list[dict]:
    """One row per installed distribution with .py files: name, version, license, files, bytes, role."""
    rows = []
    for p in installed_packages():
        role = role_of(p)
        used = package_docs(p, MAX_PACKAGE_BYTES) if role == "train" else []
        rows.append(dict(name=p.name, version=p.version, license=p.license, files=len(p.files), bytes=p.bytes,
                         role=role, used_files=len(used), used_bytes=sum(os.path.getsize(f) for f, _ in used)))
    return rows


def format_sources_table(rows: list[dict]) -> str:
    lines = [f"{'distribution':28s} {'version':12s} {'files':>6s} {'MB':>7s} {'in code':>8s}  {'role':34s} license"]
    for r in rows:
        lines.append(f"{r['name'][:28]:28s} {r['version'][:12]:12s} {r['files']:6d} {r['bytes'] / 1e6:7.2f} "
                     f"{r['used_bytes'] / 1e6:8.2f}  {r['role']:34s} {r['license'][:60]}")
    train = [r for r in rows if r["role"] == "train"]
    lines.append(f"`--data code` = stdlib + {len(train)} distributions, {sum(r['used_files'] for r in train)} files, "
                 f"{sum(r['used_bytes'] for r in train) / 1e6:.1f} MB (at most {MAX_PACKAGE_BYTES / 1e6:g} MB of "
                 f"each); held out: {', '.join(HELDOUT_PACKAGES)}")
    return "\n".join(lines)
