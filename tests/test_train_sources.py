"""Named training sources: `code`, `site:NAME`, `heldout-packages`, licenses, and the stdlib split they keep."""
import importlib.metadata as md
import subprocess
import sys

import pytest

from dsv3.train import sources
from dsv3.train.data import is_heldout, resolve_docs, stdlib_docs


@pytest.mark.parametrize("text, ok", [
    ("MIT", True), ("BSD-3-Clause", True), ("Apache-2.0 OR BSD-2-Clause", True), ("PSF-2.0", True),
    ("ISC License (ISCL)", True), ("MIT License / Apache Software License", True),
    ("MPL-2.0", False), ("MPL-2.0 AND MIT", False), ("GPL-3.0-or-later", False), ("LGPLv3", False),
    ("UNKNOWN", False), ("Public Domain", False), ("", False),
])
def test_license_classification(text, ok):
    assert sources.Package("x", "1", text, (), 0).permissive is ok


def _fake_dist(tmp_path, name, license_lines, files):
    """A dist-info directory with METADATA and RECORD, as pip writes it, plus the files it lists."""
    site = tmp_path / "site"
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: " + name + "\nVersion: 1.0\n" + license_lines)
    record = []
    for rel, text in files.items():
        f = site / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        record.append(f"{rel},,")
    record.append("../../bin/tool.py,,")  # a script outside site-packages: not a source
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return md.PathDistribution(info)


def test_license_and_files_from_real_metadata(tmp_path, monkeypatch):
    dist = _fake_dist(tmp_path, "pkg", "License-Expression: BSD-3-Clause\n",
                      {"pkg/__init__.py": "x = 1\n", "pkg/data.json": "{}", "pkg/big.py": "#" * 500,
                       "pkg/__pycache__/a.py": "y = 2\n", "pkg/empty.py": ""})
    assert sources.license_of(dist) == "BSD-3-Clause"
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 100)
    files = sources._python_files(dist)
    assert [rel for _, rel in files] == ["pkg/__init__.py"]  # no json, no >100 B, no cache, no empty, no ../
    classic = _fake_dist(tmp_path / "b", "old", "License: Dual License\nClassifier: License :: OSI Approved :: "
                                                 "BSD License\n", {"old.py": "z = 3\n"})
    assert sources.license_of(classic) == "BSD License"
    bare = _fake_dist(tmp_path / "c", "bare", "", {"bare.py": "z = 3\n"})
    assert sources.license_of(bare) == "UNKNOWN"


def test_package_budget_takes_whole_files_in_a_fixed_order(tmp_path):
    dist = _fake_dist(tmp_path, "many", "License-Expression: MIT\n",
                      {f"many/m{i}.py": "a = 1\n" * 10 for i in range(20)})
    pkg = sources.Package("many", "1.0", "MIT", sources._python_files(dist), 20 * 60)
    kept = sources.package_docs(pkg, max_bytes=300)
    assert len(kept) == 5 and all(name.startswith("site/many/many/m") for _, name in kept)
    assert kept == sources.package_docs(pkg, max_bytes=300)  # deterministic
    assert len(sources.package_docs(pkg)) == 20


def test_roles():
    P = sources.Package
    assert sources.role_of(P("click", "8", "BSD-3-Clause", (), 0)) == "heldout"
    assert sources.role_of(P("openai", "1", "Apache-2.0", (), 0)).startswith("excluded")
    assert sources.role_of(P("thing", "1", "GPL-3.0", (), 0)) == "excluded (license)"
    assert sources.role_of(P("Thing_Two", "1", "MIT", (), 0)) == "train"


def test_code_keeps_the_stdlib_split_and_never_holds_heldout_packages():
    code = resolve_docs(["code"])
    std = stdlib_docs()
    by_rel = {d.rel for d in code}
    assert {d.rel for d in std} <= by_rel  # the stdlib documents keep their names, hence their split
    assert [d for d in std if is_heldout(d.rel)] == [d for d in code if d.rel in {s.rel for s in std}
                                                     and is_heldout(d.rel)]
    site = [d for d in code if d.rel.startswith("site/")]
    assert site, "no permissively licensed package with .py files is installed (pytest itself is MIT)"
    dists = {d.rel.split("/")[1].lower().replace("_", "-") for d in site}
    assert not dists & {h.lower() for h in sources.HELDOUT_PACKAGES}
    assert not dists & {e.lower() for e in sources.EXCLUDED}
    assert "pytest" in dists
    held = resolve_docs(["heldout-packages"])
    assert held and not {d.path for d in held} & {d.path for d in code}


def test_site_source_and_its_errors():
    docs = resolve_docs(["site:pytest"])
    assert docs and all(d.rel.startswith("site/pytest/") and d.path.endswith(".py") for d in docs)
    with pytest.raises(ValueError, match="no installed distribution named 'no-such-dist'.*--list-sources"):
        resolve_docs(["site:no-such-dist"])
    with pytest.raises(FileNotFoundError, match="'code'"):
        resolve_docs(["not/a/path.py"])


def test_list_sources_cli():
    out = subprocess.run([sys.executable, "-m", "dsv3", "train", "--list-sources"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pytest" in out.stdout and "`--data code` = stdlib +" in out.stdout
    assert "held out: " + ", ".join(sources.HELDOUT_PACKAGES) in out.stdout
