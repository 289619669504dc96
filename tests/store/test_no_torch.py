"""A store packed here, received where torch is not installed: a subprocess in which 'import torch'
fails verifies, unpacks, queries, probes and exports it through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from scdrugmap.store import pack as P

SCRIPT = textwrap.dedent('''
    import json
    import sys


    class NoTorch:
        """A meta-path finder that makes torch look uninstalled."""

        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("torch is importable: the blocker failed")

    from scdrugmap.cli import main

    for args in json.loads(sys.argv[1]):
        try:
            main(args, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not loaded, loaded
    print("NO-TORCH-OK")
''')


def test_received_store_works_without_torch(small_store, tmp_path):
    pack = tmp_path / "st.tar.zst"
    P.pack(small_store, pack, strip_paths=True)
    st = tmp_path / "received"
    commands = [
        ["store", "verify", str(pack)],
        ["store", "unpack", str(pack), str(st)],
        ["store", "info", str(st)],
        ["query", "--store", str(st), "SELECT dataset, count(*) AS n FROM cohort GROUP BY 1 ORDER BY 1"],
        ["probe", "--store", str(st), "--backbone", "pca", "--head", "lr", "--protocol", "cross", "--quiet"],
        ["leaderboard", "--store", str(st)],
        ["export", "--store", str(st), "--backbone", "pca", "--where", "label = 'resistant'",
         "--to", str(tmp_path / "resistant.h5ad")],
    ]
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "NO-TORCH-OK" in out
    assert "all match the manifest" in out and "unpacked" in out and "SimData10" in out
    assert "Leaderboard" in out and "cross" in out
    assert (tmp_path / "resistant.h5ad").stat().st_size > 0
