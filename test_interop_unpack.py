"""Interop tests of unpacking: zlayer_registry against umoci and GNU tar.

An image of three hand-written layers (``_oci_testkit`` section 5) holds every entry type
and every whiteout form of image-spec ``layer.md``: files of many modes (setuid, setgid,
0600, 0000), directories of mode 0555, 2755, 1777 and 0700, nested and implied
directories, absolute and relative symlinks, hard links (within a layer, to a lower
layer, to a symlink), a fifo, device nodes, xattrs, owners other than root, whiteouts of
files and directories, opaque whiteouts before and after new entries, a file replaced by a
directory and a directory by a symlink, paths re-added after a whiteout, and symlinks that
point out of the root. The layers are gzip, plain tar and zstd (``mixed``); a twin image
holds the same tars with the zstd one gzipped, because umoci 0.4 refuses zstd.

Both images go into ``docker-registry serve`` with ``skopeo copy --preserve-digests`` (a
plain ``skopeo copy`` gzips the tar layer). Our ``ImagePuller.unpack`` of
``127.0.0.1:PORT/unpack/mixed:mixed`` is compared with ``umoci unpack`` of the layout we
built and of a ``skopeo copy`` of the pushed twin back into a layout: paths, types,
permission bits, symlink targets, contents, hard-link groups and the mtimes both tools take
from the tar headers; as root also owners and xattrs (against umoci without --rootless).

Known differences:
    * ``as_root=False`` clears setuid/setgid, sets no xattrs and skips device nodes;
      ``umoci --rootless`` keeps setuid/setgid, keeps ``user.*`` xattrs, records owners in
      ``user.rootlesscontainers`` and writes empty regular files for device nodes. GNU
      tar as an unprivileged user clears setuid/setgid/sticky and applies the umask
      (``tar -p`` keeps them). TestRootless pins our documented behaviour.
    * TestDivergences and TestEscapes pin cases where an earlier version differed from
      umoci, GNU tar or the spec, or was unsafe: they must now match.

A missing tool skips these tests, unless ``ZLAYER_REQUIRE_INTEROP=1``, which fails them.

Blocks:
    SCENARIO       the layers, entry by entry, and what the result must hold
    FIXTURES       layouts, pushed images, unpacked trees shared by the session
    TOOLS          skopeo and umoci on the scenario, without zlayer_registry
    UMOCI          our unpack against umoci's, as root
    GNU TAR        the base layer against ``tar -xpf --xattrs``
    ROOTLESS       as_root=False, and a real unprivileged user (uid 65534)
    CLI            ``zlayer_registry unpack`` and unpack_layer against unpack_layers
    DIVERGENCES    cases that once differed from umoci, tar or the spec
    ESCAPES        hostile layers that try to reach outside the root
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The helper sits beside this file; --import-mode=importlib would not put it on sys.path.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _oci_testkit as kit  # noqa: E402

pytestmark = pytest.mark.interop

F, D, S, H = kit.file_entry, kit.dir_entry, kit.symlink_entry, kit.hardlink_entry
W, O = kit.whiteout_entry, kit.opaque_entry
NOBODY = 65534


_unavailable = kit.unavailable  # skip, or fail under ZLAYER_REQUIRE_INTEROP=1


def _require(*tools: str) -> None:
    for tool in tools:
        try:
            kit.require_tool(tool)
        except kit.ToolMissing as exc:
            missing = str(exc)
            break
    else:
        return
    _unavailable(missing)  # outside the except block: no chained traceback in the report


def _require_root() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _unavailable("needs root (ownership, xattrs, device nodes, setpriv)")


# =============================================================================
# SCENARIO: three layers; each layer's entries carry their own mtime
# =============================================================================

MTIME = (kit._EPOCH_S, kit._EPOCH_S + 86_400, kit._EPOCH_S + 2 * 86_400)
XATTR_FILE = (("user.zlayer", "hello"), ("trusted.zlayer", "t"))
XATTR_DIR = (("user.zlayer", "dir"),)


def _at(mtime: int, entries):
    return [dataclasses.replace(entry, mtime=mtime) for entry in entries]


BASE = _at(MTIME[0], [
    D("bin"), F("bin/busybox", b"#!busybox\n", 0o755), S("bin/sh", "/bin/busybox"),
    D("usr"), D("usr/lib"), F("usr/lib/libc.so", b"libc"), F("usr/lib/old.so", b"old"),
    S("lib", "usr/lib"), S("abslib", "/usr/lib"),
    D("usr/bin"), F("usr/bin/suid", b"suid", 0o4755), F("usr/bin/sgid", b"sgid", 0o2755),
    F("usr/bin/ro-exec", b"r-x", 0o555), H("usr/bin/busybox-hard", "bin/busybox"),
    D("etc"), F("etc/shadow", b"root:x:", 0o600), F("etc/hosts", b"127.0.0.1 localhost\n"),
    H("etc/hosts.link", "etc/hosts"), F("etc/readonly", b"r", 0o444), F("etc/noperm", b"n", 0o000),
    F("etc/xattrs", b"x", xattrs=XATTR_FILE),
    D("ro", 0o555), F("ro/file", b"in a 0555 directory"), F("ro/gone", b"x"),
    D("sgid-dir", 0o2755), F("sgid-dir/f", b"f"), D("tmp", 0o1777), D("private", 0o700),
    F("private/key", b"k", 0o600), D("xattr-dir", xattrs=XATTR_DIR),
    D("home"), D("home/user", 0o750, uid=1000, gid=1000),
    F("home/user/.profile", b"profile", uid=1000, gid=100),
    kit.TarEntry("home/user/link", "symlink", mode=0o777, linkname="../../etc/hosts",
                 uid=1000, gid=1000),
    F("empty"), F("a/b/c/d/e/deep.txt", b"implied parents"),
    D("run"), kit.fifo_entry("run/fifo", 0o644),
    D("dev"), kit.device_entry("dev/null", "char", 1, 3),
    kit.device_entry("dev/loop0", "block", 7, 0, 0o660),
    D("later-ro"), F("later-ro/file", b"written before the directory became 0555"),
    D("wh-dir"), F("wh-dir/x", b"x"), D("wh-dir/sub"), F("wh-dir/sub/y", b"y"),
    F("wh-file", b"whited out"),
    D("opq-before"), F("opq-before/old", b"old"), D("opq-before/olddir"),
    F("opq-before/olddir/z", b"z"),
    D("opq-after"), F("opq-after/old", b"old"), D("opq-after/keepdir"),
    F("opq-after/keepdir/old", b"old"),
    D("opq-redeclared"), D("opq-redeclared/sub", 0o700), F("opq-redeclared/sub/z", b"z"),
    D("opt"), F("opt/lower", b"lower"), S("optlink", "/opt"),
    F("replaced-file", b"a file"), D("replaced-dir"), F("replaced-dir/inner", b"inner"),
    D("symlink-to-dir-target"), S("symlink-to-dir", "symlink-to-dir-target"),
    kit.fifo_entry("fifo-to-file"), F("file-to-fifo", b"f"),
    F("readd-later", b"v1"), F("readd-same-layer", b"v1"),
    F("dup", b"first"), H("dup-link", "dup"), F("dup", b"second"),
    S("escape", "../../../../.."), S("escape-abs", "/"),
    F("x" * 60 + "/" + "y" * 90 + "/long", b"a path longer than 100 bytes"),
    F("\u00fcn\u00efc\u00f8d\u00e9 name.txt", b"utf-8"),
])

CHANGES = _at(MTIME[1], [
    W("wh-file"), W("wh-dir"),
    O("opq-before"), F("opq-before/new", b"new"),
    D("opq-after"), F("opq-after/new", b"new"), F("opq-after/keepdir/new", b"new"), O("opq-after"),
    O("opq-redeclared"), D("opq-redeclared/sub", 0o750), F("opq-redeclared/sub/w", b"w"),
    D("replaced-file", 0o750), F("replaced-file/inner", b"now a directory"),
    S("replaced-dir", "usr/lib"),
    D("symlink-to-dir", 0o711), F("symlink-to-dir/in", b"in"),
    F("fifo-to-file", b"now a file"), kit.fifo_entry("file-to-fifo", 0o600),
    D("later-ro", 0o555),
    W("readd-later"), W("readd-same-layer"), F("readd-same-layer", b"v2, same layer"),
    F("etc/hosts", b"127.0.0.1 replaced\n"),
    W("lib/old.so"),  # through the relative symlink lib -> usr/lib
    F("usr/bin/suid2", b"s2", 0o4711),
    H("hardlink-to-symlink", "bin/sh"),
    H("hardlink-via-symlink", "lib/libc.so"),
])

TOP = _at(MTIME[2], [
    F("readd-later", b"v2, later layer"),
    F("later-ro/newfile", b"into a directory a lower layer made 0555"),
    W("ro/gone"),
    F("lib/added.so", b"through lib -> usr/lib"),
    F("abslib/viaabs.so", b"through abslib -> /usr/lib"),
    O("optlink"), F("optlink/upper", b"opaque through optlink -> /opt"),
    F("new/implicit/file", b"implied parents"),
    H("hardlink-to-lower", "usr/lib/libc.so"),
    F("escape/escaped.txt", b"must stay inside"), F("escape-abs/escaped-abs.txt", b"inside too"),
])

LAYERS = (BASE, CHANGES, TOP)
DEVICES = ("dev/null", "dev/loop0")


def _children(tree: dict, directory: str) -> set:
    prefix = directory + "/"
    return {p[len(prefix):] for p in tree if p.startswith(prefix) and "/" not in p[len(prefix):]}


def _assert_scenario(tree: dict, as_root: bool = True) -> None:
    """Checks the unpacked scenario against image-spec layer.md, independently of umoci."""
    def kind(path):
        return tree[path]["type"] if path in tree else None

    def content(path):
        assert kind(path) == "file", (path, tree.get(path))
        return tree[path]["sha256"]

    for gone in ("wh-file", "wh-dir", "ro/gone", "usr/lib/old.so", "opq-before/old",
                 "opq-before/olddir", "opq-after/old", "opq-after/keepdir/old",
                 "opq-redeclared/sub/z", "opt/lower", "replaced-dir/inner"):
        assert gone not in tree, gone
    assert _children(tree, "opq-before") == {"new"}
    assert _children(tree, "opq-after") == {"new", "keepdir"}
    assert _children(tree, "opq-after/keepdir") == {"new"}
    assert _children(tree, "opq-redeclared/sub") == {"w"}
    assert tree["opq-redeclared/sub"]["mode"] == 0o750
    assert _children(tree, "opt") == {"upper"}
    assert kind("optlink") == "symlink"
    assert (kind("replaced-file"), tree["replaced-file"]["mode"]) == ("dir", 0o750)
    assert (kind("replaced-dir"), tree["replaced-dir"]["target"]) == ("symlink", "usr/lib")
    assert (kind("symlink-to-dir"), tree["symlink-to-dir"]["mode"]) == ("dir", 0o711)
    assert (kind("fifo-to-file"), kind("file-to-fifo")) == ("file", "fifo")
    assert tree["bin/sh"]["target"] == "/bin/busybox"
    assert tree["lib"]["target"] == "usr/lib"
    assert {"added.so", "viaabs.so", "libc.so"} <= _children(tree, "usr/lib")
    assert kind("escaped.txt") == kind("escaped-abs.txt") == "file"
    assert content("readd-later") == kit.sha256_bytes(b"v2, later layer")
    assert content("readd-same-layer") == kit.sha256_bytes(b"v2, same layer")
    assert content("etc/hosts.link") == kit.sha256_bytes(b"127.0.0.1 localhost\n")
    assert content("dup") == kit.sha256_bytes(b"second")
    assert content("dup-link") == kit.sha256_bytes(b"first")
    assert tree["later-ro"]["mode"] == tree["ro"]["mode"] == 0o555
    assert kind("later-ro/newfile") == "file"
    assert tree["tmp"]["mode"] == 0o1777
    assert tree["etc/noperm"]["mode"] == 0
    special = 0o6000 if as_root else 0
    assert tree["usr/bin/suid"]["mode"] == 0o755 | (special & 0o4000)
    assert tree["usr/bin/sgid"]["mode"] == 0o755 | (special & 0o2000)
    assert tree["sgid-dir"]["mode"] == 0o755 | (special & 0o2000)
    assert kit.hardlink_groups(tree) == [
        ("bin/busybox", "usr/bin/busybox-hard"),
        ("bin/sh", "hardlink-to-symlink"),
        ("hardlink-to-lower", "hardlink-via-symlink", "usr/lib/libc.so"),
    ]


# =============================================================================
# FIXTURES
# =============================================================================


@pytest.fixture(scope="session")
def distribution_registry(tmp_path_factory):
    """Runs an open ``docker-registry serve`` on 127.0.0.1; stopped by PID at teardown."""
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution"))


@pytest.fixture(scope="session")
def scenario(tmp_path_factory):
    """Writes ``mixed`` (gzip, tar, zstd) and its all-umoci ``twin`` (gzip, tar, gzip)."""
    _require("zstd")
    layout = tmp_path_factory.mktemp("layout-unpack")
    base, changes = (kit.write_entries_layer(layout, LAYERS[0], "gzip"),
                     kit.write_entries_layer(layout, LAYERS[1], "tar"))
    mixed = kit.build_image_from_layers(
        layout, "mixed", [base, changes, kit.write_entries_layer(layout, LAYERS[2], "zstd")])
    twin = kit.build_image_from_layers(
        layout, "twin", [base, changes, kit.write_entries_layer(layout, LAYERS[2], "gzip")])
    return types.SimpleNamespace(layout=layout, mixed=mixed, twin=twin)


@pytest.fixture(scope="session")
def pushed(distribution_registry, scenario):
    """Pushes both images unchanged, as ``unpack/mixed:mixed`` and ``unpack/twin:twin``."""
    registry = distribution_registry
    out = types.SimpleNamespace(registry=registry)
    for name in ("mixed", "twin"):
        digest = kit.push_exact(registry, scenario.layout, name, "unpack/" + name)
        assert digest == getattr(scenario, name).digest
        setattr(out, name, registry.reference("unpack/" + name, name))
    return out


@pytest.fixture(scope="session")
def ours(zr, pushed, tmp_path_factory):
    """Returns the snapshot of ``ImagePuller.unpack`` of the mixed image (as this user)."""
    work = tmp_path_factory.mktemp("ours")
    puller = zr.ImagePuller(zr.BlobCache.open(str(work / "cache")), platform="linux/amd64")
    puller.unpack(pushed.mixed, str(work / "rootfs"))
    assert sorted(os.listdir(str(work))) == ["cache", "rootfs"]  # no staging left behind
    return kit.snapshot_tree(work / "rootfs")


def _umoci_snapshot(layout: Path, tag: str, bundle: Path, rootless: bool) -> dict:
    _require("umoci")
    return kit.snapshot_tree(kit.umoci_unpack(layout, tag, bundle, rootless=rootless))


@pytest.fixture(scope="session")
def umoci_trees(scenario, pushed, tmp_path_factory):
    """Returns umoci --rootless unpacks of the twin: from our layout and via skopeo."""
    work = tmp_path_factory.mktemp("umoci")
    copied = work / "copied-layout"
    digest = kit.skopeo_to_layout(pushed.registry, "unpack/twin", "twin", copied)
    assert digest == scenario.twin.digest
    return {
        "built-layout": _umoci_snapshot(scenario.layout, "twin", work / "built", True),
        "skopeo-copy": _umoci_snapshot(copied, "twin", work / "copied", True),
    }


def _explicit_mtimes(tree: dict, reference: dict) -> dict:
    """Returns the mtimes of ``tree`` where ``reference`` took its mtime from a tar header.

    Both tools give a directory without a header of its own (implied parents) the time of
    extraction, and umoci sets the root to 0; those are not compared.
    """
    return {path: tree.get(path, {}).get("mtime") for path, item in reference.items()
            if path != "." and item["mtime"] in MTIME}


def _without(tree: dict, paths) -> dict:
    return {p: item for p, item in tree.items() if p not in paths}


# =============================================================================
# TOOLS: skopeo and umoci on the scenario, without zlayer_registry
# =============================================================================


class TestTools:
    def test_twin_holds_the_same_tars(self, scenario):
        assert scenario.mixed.diff_ids == scenario.twin.diff_ids
        assert [b.media_type for b in scenario.mixed.layers] == [
            kit.MEDIA_TYPE_OCI_LAYER_GZIP, kit.MEDIA_TYPE_OCI_LAYER_TAR, kit.MEDIA_TYPE_OCI_LAYER_ZSTD]

    def test_registry_keeps_plain_and_zstd_layers(self, pushed, scenario):
        digest, _, body = pushed.registry.manifest("unpack/mixed", "mixed")
        assert digest == scenario.mixed.digest
        assert [(layer["digest"], layer["mediaType"]) for layer in json.loads(body)["layers"]] == [
            (b.digest, b.media_type) for b in scenario.mixed.layers]

    def test_umoci_result_matches_the_spec(self, umoci_trees):
        # The scenario's expectations hold for umoci too: it is a fair reference.
        for tree in umoci_trees.values():
            _assert_scenario(tree)

    def test_umoci_zstd_support(self, scenario, tmp_path):
        _require("umoci")
        try:
            tree = _umoci_snapshot(scenario.layout, "mixed", tmp_path / "bundle", True)
        except RuntimeError as exc:
            # umoci 0.4.7 (Debian 12): "blob is not correct mediatype: ...tar+zstd", which
            # is why the gzip twin stands in for the comparisons. Not a skip: the refusal
            # itself is what this test pins down for this umoci.
            assert "mediatype" in str(exc) and "zstd" in str(exc)
            return
        _assert_scenario(tree)


# =============================================================================
# UMOCI: our unpack of the pushed image against umoci's
# =============================================================================


class TestAgainstUmoci:
    @pytest.mark.parametrize("source", ["built-layout", "skopeo-copy"])
    def test_paths_types_modes_targets_contents(self, ours, umoci_trees, source):
        # umoci --rootless writes device nodes as empty files; test_owners_xattrs_devices_as_root
        # compares them with umoci as root.
        theirs = _without(umoci_trees[source], DEVICES)
        assert kit.tree_differences(kit.comparable(_without(ours, DEVICES)),
                                    kit.comparable(theirs)) == []

    def test_scenario_holds(self, ours):
        _assert_scenario(ours)

    def test_unpack_from_the_layout_itself(self, zr, scenario, umoci_trees, tmp_path):
        # Both tools read the same OCI layout: no registry in between.
        puller = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")), platform="linux/amd64")
        manifest = puller.unpack_layout(f"oci:{scenario.layout}:twin", str(tmp_path / "rootfs"))
        assert manifest.digest == scenario.twin.digest and puller.request_count == 0
        from_layout = kit.snapshot_tree(tmp_path / "rootfs")
        _assert_scenario(from_layout)
        assert kit.tree_differences(kit.comparable(_without(from_layout, DEVICES)),
                                    kit.comparable(_without(umoci_trees["built-layout"],
                                                            DEVICES))) == []
        assert kit.hardlink_groups(from_layout) == kit.hardlink_groups(
            umoci_trees["built-layout"])

    @pytest.mark.parametrize("source", ["built-layout", "skopeo-copy"])
    def test_hardlink_groups(self, ours, umoci_trees, source):
        assert kit.hardlink_groups(ours) == kit.hardlink_groups(umoci_trees[source])

    def test_mtimes_from_headers(self, ours, umoci_trees):
        theirs = umoci_trees["built-layout"]
        assert _explicit_mtimes(ours, theirs) == _explicit_mtimes(theirs, theirs)
        assert ours["usr/lib"]["mtime"] == MTIME[0]  # restored after layers wrote into it

    def test_owners_xattrs_devices_as_root(self, ours, scenario, tmp_path):
        # umoci without --rootless (as root) applies owners, xattrs and device nodes, as
        # we do when running as root.
        _require_root()
        theirs = _umoci_snapshot(scenario.layout, "twin", tmp_path / "bundle", False)
        fields = ("type", "mode", "rdev", "uid", "gid", "xattrs")
        assert kit.tree_differences(kit.comparable(ours, fields),
                                    kit.comparable(theirs, fields)) == []
        assert (ours["home/user/.profile"]["uid"], ours["home/user/.profile"]["gid"]) == (1000, 100)
        assert ours["home/user/link"]["uid"] == 1000  # lchown, not the target
        assert ours["etc/xattrs"]["xattrs"] == {"trusted.zlayer": b"t", "user.zlayer": b"hello"}
        assert ours["dev/loop0"]["rdev"] == (7, 0)

    def test_nothing_escapes(self, zr, pushed, tmp_path):
        before = set(os.listdir("/"))
        puller = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")), platform="linux/amd64")
        puller.unpack(pushed.mixed, str(tmp_path / "nest" / "rootfs"))
        assert os.listdir(str(tmp_path / "nest")) == ["rootfs"]
        assert set(os.listdir("/")) == before
        assert not os.path.exists("/usr/lib/viaabs.so")
        assert not os.path.exists("/opt/upper")


# =============================================================================
# GNU TAR: the base layer (no whiteouts) against tar as root
# =============================================================================


class TestAgainstTar:
    def test_base_layer_matches_tar(self, zr, scenario, tmp_path):
        _require_root()
        _require("tar")
        layer = kit.layer_blob_paths(scenario.layout, scenario.twin)[0]
        by_tar = tmp_path / "tar"
        by_tar.mkdir()
        # As root GNU tar keeps owners; -p keeps setuid/setgid/sticky; --xattrs applies the
        # SCHILY.xattr records (user.* and trusted.* with the include pattern).
        subprocess.run(["tar", "-xpzf", str(layer), "--xattrs", "--xattrs-include=*",
                        "-C", str(by_tar)], check=True, stdin=subprocess.DEVNULL)
        zr.LayerUnpacker(str(tmp_path / "ours")).unpack_layers([str(layer)])
        ours, theirs = kit.snapshot_tree(tmp_path / "ours"), kit.snapshot_tree(by_tar)
        fields = ("type", "mode", "size", "sha256", "target", "rdev", "uid", "gid", "xattrs")
        assert kit.tree_differences(_without(kit.comparable(ours, fields), "."),
                                    _without(kit.comparable(theirs, fields), ".")) == []
        assert kit.hardlink_groups(ours) == kit.hardlink_groups(theirs)
        assert _explicit_mtimes(ours, theirs) == _explicit_mtimes(theirs, theirs)


# =============================================================================
# ROOTLESS: as_root=False, and a real unprivileged user
# =============================================================================


def _rootless_expected(umoci_tree: dict) -> dict:
    """Returns what as_root=False must give where umoci --rootless gives ``umoci_tree``.

    Ours clears setuid/setgid (files and directories, like GNU tar without -p) and skips
    device nodes, which umoci --rootless writes as empty regular files.
    """
    out = {}
    for path, item in kit.comparable(_without(umoci_tree, DEVICES)).items():
        item = dict(item)
        item["mode"] &= ~0o6000
        out[path] = item
    return out


class TestRootless:
    def test_as_root_false_against_umoci_rootless(self, zr, scenario, umoci_trees, tmp_path):
        unpacker = zr.LayerUnpacker(str(tmp_path / "rootfs"), as_root=False)
        unpacker.unpack_layers(kit.layer_blob_paths(scenario.layout, scenario.mixed))
        ours = kit.snapshot_tree(tmp_path / "rootfs")
        assert sorted(unpacker.skipped) == sorted(DEVICES)
        assert kit.tree_differences(kit.comparable(ours),
                                    _rootless_expected(umoci_trees["built-layout"])) == []
        _assert_scenario(ours, as_root=False)
        assert all(item["xattrs"] == {} for item in ours.values())
        assert {item["uid"] for item in ours.values()} == {os.geteuid()}

    @pytest.fixture()
    def shared_dir(self):
        """Returns a directory uid 65534 can use (pytest's tmp dirs are 0700), removed after."""
        _require_root()
        _require("setpriv")
        path = Path(tempfile.mkdtemp(prefix="zlayer-unpack-nobody-"))
        os.chmod(str(path), 0o755)
        try:
            yield path
        finally:
            kit.rmtree(path)

    @staticmethod
    def _as_nobody(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
        # The environment is kept (a shared-library Python needs its LD_LIBRARY_PATH).
        env = dict(os.environ, HOME=str(cwd), PYTHONPATH=str(HERE), PYTHONDONTWRITEBYTECODE="1")
        return subprocess.run(
            ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", "--"]
            + list(cmd), cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)

    def _copy_layout(self, scenario, shared_dir: Path) -> Path:
        layout = shared_dir / "layout"
        shutil.copytree(str(scenario.layout), str(layout))
        for dirpath, _, filenames in os.walk(str(layout)):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        work = shared_dir / "work"
        work.mkdir()
        os.chown(str(work), NOBODY, NOBODY)
        return layout

    _UNPACK = ("import sys, zlayer_registry as zr\n"
               "u = zr.LayerUnpacker(sys.argv[1])\n"
               "u.unpack_layers(sys.argv[2:])\n"
               "print(u.as_root, sorted(u.skipped))\n")

    @pytest.fixture()
    def nobody_python(self, shared_dir) -> str:
        """Returns an interpreter uid 65534 can run with this checkout importable.

        This one if it can; a Python under a 0700 home (pyenv in /root) cannot be run by
        another user, and then the system's python3 stands in.
        """
        candidates = [sys.executable, shutil.which("python3", path="/usr/bin:/bin")]
        for python in filter(None, candidates):
            if self._as_nobody(shared_dir, python, "-c", "import zlayer_registry").returncode == 0:
                return python
        _unavailable("no Python that uid %d can run and import zlayer_registry with" % NOBODY)

    def test_unprivileged_user_against_umoci(self, zr, scenario, shared_dir, nobody_python):
        # Here read-only directories matter: later-ro is 0555 from layer 2 on, and layer 3
        # writes into it; ro is 0555 in the layer that fills it.
        layout = self._copy_layout(scenario, shared_dir)
        work = shared_dir / "work"
        layers = [str(p) for p in kit.layer_blob_paths(layout, scenario.mixed)]
        proc = self._as_nobody(work, nobody_python, "-c", self._UNPACK, "rootfs", *layers)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "False %s" % sorted(DEVICES)
        proc = self._as_nobody(work, "umoci", "unpack", "--rootless", "--image",
                               "%s:twin" % layout, "bundle")
        assert proc.returncode == 0, proc.stderr
        ours = kit.snapshot_tree(work / "rootfs")
        theirs = kit.snapshot_tree(work / "bundle" / "rootfs")
        assert kit.tree_differences(kit.comparable(ours), _rootless_expected(theirs)) == []
        assert kit.hardlink_groups(ours) == kit.hardlink_groups(theirs)
        assert {item["uid"] for item in ours.values()} == {NOBODY}
        _assert_scenario(ours, as_root=False)

    def test_unprivileged_unpack_layer_in_place(self, zr, scenario, shared_dir, nobody_python):
        layout = self._copy_layout(scenario, shared_dir)
        work = shared_dir / "work"
        script = ("import os, sys, zlayer_registry as zr\n"
                  "os.mkdir('rootfs')\n"
                  "u = zr.LayerUnpacker('rootfs')\n"
                  "for path in sys.argv[1:]:\n"
                  "    u.unpack_layer(path)\n")
        layers = [str(p) for p in kit.layer_blob_paths(layout, scenario.mixed)]
        proc = self._as_nobody(work, nobody_python, "-c", script, *layers)
        assert proc.returncode == 0, proc.stderr


# =============================================================================
# CLI: zlayer_registry unpack, and layer by layer
# =============================================================================


class TestCli:
    def test_cli_unpack_equals_library(self, zr, pushed, ours, tmp_path):
        env = {k: v for k, v in os.environ.items()
               if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_CONFIG_HOME", "PYTHONPATH")}
        env.update(HOME=str(tmp_path), PYTHONPATH=str(HERE), PYTHONDONTWRITEBYTECODE="1")
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "zlayer_registry", "unpack", pushed.mixed, str(tmp_path / "rootfs"),
             "--cache", str(tmp_path / "cache"), "--platform", "linux/amd64", "-q"],
            cwd=str(HERE), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        by_cli = kit.snapshot_tree(tmp_path / "rootfs")
        fields = ("type", "mode", "size", "sha256", "target", "rdev", "uid", "gid", "xattrs")
        assert kit.tree_differences(kit.comparable(by_cli, fields), kit.comparable(ours, fields)) == []
        assert kit.hardlink_groups(by_cli) == kit.hardlink_groups(ours)
        # Implied directories get the time of extraction; every other mtime is the header's.
        late = {p for p, item in by_cli.items() if item["mtime"] >= started - 1}
        assert {p: i["mtime"] for p, i in _without(by_cli, late).items()} == \
            {p: i["mtime"] for p, i in _without(ours, late).items()}

    def test_cli_refuses_a_non_empty_directory(self, zr, pushed, tmp_path):
        target = tmp_path / "rootfs"
        target.mkdir()
        (target / "keep").write_text("x")
        env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(HERE))
        proc = subprocess.run(
            [sys.executable, "-m", "zlayer_registry", "unpack", pushed.mixed, str(target),
             "--cache", str(tmp_path / "cache")], cwd=str(HERE), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=300)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert os.listdir(str(target)) == ["keep"]

    def test_unpack_layer_in_place_equals_unpack_layers(self, zr, scenario, ours, tmp_path):
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        unpacker = zr.LayerUnpacker(str(rootfs))
        for path, blob in zip(kit.layer_blob_paths(scenario.layout, scenario.mixed),
                              scenario.mixed.layers):
            with open(str(path), "rb") as f:
                unpacker.unpack_layer(f, blob.media_type)
        tree = kit.snapshot_tree(rootfs)
        assert kit.tree_differences(kit.comparable(_without(tree, ".")),
                                    kit.comparable(_without(ours, "."))) == []
        assert kit.hardlink_groups(tree) == kit.hardlink_groups(ours)


# =============================================================================
# DIVERGENCES: where we differ from umoci, GNU tar and image-spec layer.md
# =============================================================================


def _both(zr, tmp_path: Path, layers, rootless: bool = False):
    """Unpacks ``layers`` (entry lists, gzip) with us and with umoci; returns both trees."""
    layout = tmp_path / "layout"
    info = kit.build_image_from_layers(
        layout, "v1", [kit.write_entries_layer(layout, _at(MTIME[i], entries))
                       for i, entries in enumerate(layers)])
    zr.LayerUnpacker(str(tmp_path / "ours"), as_root=not rootless).unpack_layers(
        kit.layer_blob_paths(layout, info))
    theirs = _umoci_snapshot(layout, "v1", tmp_path / "bundle", rootless)
    return kit.snapshot_tree(tmp_path / "ours"), theirs


class TestDivergences:
    def test_a_layer_made_by_umoci_insert(self, zr, tmp_path):
        # umoci 0.4's insert ends the tar right after the last file's data (no
        # padding, no end blocks): umoci reads it, and so must we.
        _require("umoci")
        layout, umoci = tmp_path / "layout", kit.require_tool("umoci")
        (tmp_path / "motd").write_bytes(b"hello from umoci insert\n")
        for cmd in (["init", "--layout", str(layout)], ["new", "--image", f"{layout}:v1"],
                    ["insert", "--rootless", "--image", f"{layout}:v1",
                     str(tmp_path / "motd"), "/etc/motd"]):
            subprocess.run([umoci] + cmd, check=True, capture_output=True, timeout=120)
        puller = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")))
        puller.unpack_layout(f"oci:{layout}:v1", str(tmp_path / "ours"))
        ours = kit.snapshot_tree(tmp_path / "ours")
        theirs = kit.snapshot_tree(kit.umoci_unpack(layout, "v1", tmp_path / "bundle"))
        assert (tmp_path / "ours" / "etc" / "motd").read_bytes() == b"hello from umoci insert\n"
        assert kit.tree_differences(kit.comparable(ours, ("type", "size", "sha256", "target")),
                                    kit.comparable(theirs, ("type", "size", "sha256", "target"))) == []

    def test_whiteout_after_own_child(self, zr, tmp_path):
        _require("umoci")
        ours, theirs = _both(zr, tmp_path, [
            [D("d"), F("d/old", b"old")],
            [F("d/new", b"new"), W("d")],
        ], rootless=True)
        assert _children(theirs, "d") == {"new"}
        assert _children(ours, "d") == {"new"}

    @pytest.mark.parametrize("same_layer", [False, True], ids=["next-layer", "same-layer"])
    def test_whiteout_then_implied_directory(self, zr, tmp_path, same_layer):
        _require_root()
        _require("umoci")
        lower = [D("d", 0o700, uid=1000, gid=1000), F("d/old", b"old")]
        upper = [W("d"), F("d/new", b"new")]
        layers = [lower, upper] if same_layer else [lower, [W("d")], [F("d/new", b"new")]]
        ours, theirs = _both(zr, tmp_path, layers)
        assert _children(ours, "d") == _children(theirs, "d") == {"new"}
        assert (theirs["d"]["mode"], theirs["d"]["uid"]) == (0o755, 0)
        assert (ours["d"]["mode"], ours["d"]["uid"]) == (0o755, 0)
        assert ours["d"]["mtime"] not in MTIME  # not the deleted directory's

    def test_root_entry_metadata(self, zr, tmp_path):
        _require("umoci")
        ours, theirs = _both(zr, tmp_path, [[D(".", 0o750), F("f", b"f")]], rootless=True)
        assert theirs["."]["mode"] == 0o750
        assert ours["."]["mode"] == 0o750

    def test_backslash_in_name(self, zr, tmp_path):
        _require("umoci")
        ours, theirs = _both(zr, tmp_path, [[F("back\\slash", b"x")]], rootless=True)
        assert theirs["back\\slash"]["type"] == "file"
        assert kit.tree_differences(kit.comparable(ours), kit.comparable(theirs)) == []


# =============================================================================
# ESCAPES: hostile layers; everything they touch stays inside tmp_path
# =============================================================================
# Each test puts a victim directory beside the root filesystem. A layer must not change
# or delete it, whatever its entries say. The symlinks point at the victim by absolute
# path, as a hostile image would point at /etc.


def _layer(*entries) -> io.BytesIO:
    return io.BytesIO(kit.tar_bytes(entries))


class TestEscapes:
    @pytest.fixture()
    def victim(self, tmp_path):
        path = tmp_path / "parent" / "victim"
        (path / "etc").mkdir(parents=True)
        os.chmod(str(path / "etc"), 0o755)
        (path / "precious").write_text("keep me")
        return path

    @staticmethod
    def _untouched(victim: Path) -> None:
        assert (victim / "precious").read_text() == "keep me"
        st = os.stat(str(victim / "etc"))
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, os.geteuid())
        if hasattr(os, "listxattr"):
            assert os.listxattr(str(victim / "etc")) == []

    @pytest.mark.parametrize("in_place", [False, True], ids=["unpack_layers", "unpack_layer"])
    def test_whiteout_of_dotdot(self, zr, victim, in_place):
        rootfs = victim.parent / "rootfs"
        layers = [_layer(F("f", b"x")), _layer(F(".wh...", b""))]
        with pytest.raises(zr.UnpackError):
            if in_place:
                rootfs.mkdir()
                for layer in layers:
                    zr.LayerUnpacker(str(rootfs)).unpack_layer(layer)
            else:
                zr.LayerUnpacker(str(rootfs)).unpack_layers(layers)
        self._untouched(victim)

    @pytest.mark.parametrize("split", [False, True], ids=["one-layer", "two-layers"])
    def test_deferred_directory_metadata_through_symlink(self, zr, victim, split):
        entries = [D("d"), D("d/etc", 0o777, uid=4242, gid=4242, mtime=1234567890,
                             xattrs=(("user.zlayer", "pwned"),)),
                   S("d", str(victim))]
        layers = [_layer(*entries[:2]), _layer(entries[2])] if split else [_layer(*entries)]
        try:
            zr.LayerUnpacker(str(victim.parent / "rootfs")).unpack_layers(layers)
        except zr.UnpackError:
            pass  # refusing the layer is fine; touching the victim is not
        self._untouched(victim)

    def test_deferred_opaque_whiteout_through_symlink(self, zr, victim):
        layer = _layer(D("x"), O("x"), S("x", str(victim)))
        try:
            zr.LayerUnpacker(str(victim.parent / "rootfs")).unpack_layers([layer])
        except zr.UnpackError:
            pass
        self._untouched(victim)

    @pytest.mark.parametrize("name", [".wh.", ".wh.."])
    def test_whiteout_of_the_root(self, zr, tmp_path, name):
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        unpacker = zr.LayerUnpacker(str(rootfs))
        unpacker.unpack_layer(_layer(F("keep", b"k")))
        with pytest.raises(zr.UnpackError) as excinfo:
            unpacker.unpack_layer(_layer(F(name, b"")))
        assert excinfo.value.member == name
        assert (rootfs / "keep").read_bytes() == b"k"
        with pytest.raises(zr.UnpackError):
            zr.LayerUnpacker(str(tmp_path / "new")).unpack_layers(
                [_layer(F("keep", b"k")), _layer(F(name, b""))])
