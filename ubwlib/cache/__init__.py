"""Content-addressed cache of trained models, tensors and result tables.

Every expensive result of the book (a trained network, a crafted poison set, a table of
metrics) is stored under a key derived from *what* was computed: a namespace (a single folder name such
as ``"train"`` or ``"ubw-craft"``), the full settings that determine the result,
and a version string that the caller bumps whenever the code producing the result changes
meaning. A rebuilt book with a warm cache therefore never retrains.

Layout on disk (``root`` is :func:`ubwlib._paths.cache_root` unless given)::

    <root>/.ubwlib-cache                marker (JSON, with a format version) written only when
                                        ubwlib creates the root (or finds it empty); clear() needs it
    <root>/CACHEDIR.TAG                 marker for backup tools (written together with the above)
    <root>/<namespace>/<hash20>/        one entry (hash20 = first 20 hex chars of the key)
        tensors.pt                      dict[str, Tensor] written by torch.save
        data.json                       any JSON payload (tables as records, histories, ...)
        meta.json                       namespace, version, canonical settings, full hash,
                                        created time, ubwlib/torch versions, sha256 of both files;
                                        also the entry's own marker (its hash starts with <hash20>)
    <root>/<namespace>/<hash20>.ckpt/   a resumable computation's checkpoint (checkpoint.pt, which
                                        records namespace and full hash: its marker)
    <root>/<namespace>/.tmp-<hash20>-*  an entry being written (renamed into place atomically)
    <root>/.compute.lock                the compute lock (an empty file; Cache.computing flocks it)
    <root>/data/                        derived dataset files made by ubwlib.data (decoded tensors;
                                        folders of decompressed IDX files left by older versions)
                                        and its downloads (torchvision/)

Key points of the contract:

* Hashing (:func:`settings_hash`) is canonical: dict key order never matters; unknown types
  raise :class:`TypeError` instead of being silently ``str()``-ed. See
  :func:`canonical_settings` for the exact rules (``1`` and ``1.0`` hash *differently*).
* Entries are written into a temporary directory next to their final place and then
  ``os.rename``-d onto it, so readers never see half an entry. If another process won the
  race, its entry is kept and ours discarded.
* Tensors are only ever loaded with ``torch.load(..., weights_only=True, map_location="cpu")``:
  a cache folder cannot execute code. Every read verifies the sha256 checksums recorded in
  ``meta.json``; a damaged entry is moved aside and deleted with a
  :class:`CacheCorruptionWarning`, and is then simply recomputed.
* :meth:`Cache.clear` only deletes what the cache provably made: it refuses a root without the
  ``.ubwlib-cache`` marker (a folder that existed with content before ubwlib used it never gets
  one; a root written by an older ubwlib has only ``CACHEDIR.TAG`` and must be marked with
  :meth:`Cache.adopt` first), and inside a marked root it deletes only entries whose
  ``meta.json`` matches their folder, checkpoints whose file records their hash, leftovers holding
  nothing but cache files, and the derived dataset copies under ``data/`` (never the downloads
  in ``data/torchvision``, never a user's dataset: links to originals are unlinked, not followed).
* One computation at a time per root: :meth:`Cache.get_or_compute` computes under an exclusive ``flock`` of
  ``.compute.lock`` (:meth:`Cache.computing`; nested computations run under their caller's), and looks again
  once it holds it. Processes sharing a cache (``make book``'s chapters executed side by side) never train side
  by side on the same cores, and a result two of them ask for is computed once.
* ``Cache(enabled=False)`` never touches the disk (always computes). The environment variable
  ``UBW_NO_CACHE=1`` (also ``true``/``yes``/``on``) disables *reads* only: everything is
  recomputed, and the fresh results replace the stored ones.

The package, one job per module (everything public is imported here):

* :mod:`~ubwlib.cache.keys`: canonical settings and their hash (:func:`settings_hash`);
* :mod:`~ubwlib.cache.store`: :class:`Cache`, its entries, listing and clearing;
* :mod:`~ubwlib.cache.layout`: file and folder names, the root's markers (:func:`ensure_cache_root`) and the
  checks that prove a folder was made by the cache;
* :mod:`~ubwlib.cache.checkpoints`: :class:`Checkpoint`, the state of a resumable computation;
* :mod:`~ubwlib.cache.payload`: tensors and JSON data of entries and checkpoints, model weights as tensors;
* :mod:`~ubwlib.cache.tables`: pandas tables as JSON data;
* :mod:`~ubwlib.cache.files`: :func:`atomic_path`, the one way ubwlib writes a file.
"""

from __future__ import annotations

from .checkpoints import Checkpoint, CheckpointState
from .files import atomic_path, write_bytes_atomic, write_text_atomic
from .keys import canonical_json, canonical_settings, settings_hash
from .layout import CACHE_MARKER_NAME, CACHEDIR_TAG_NAME, CACHEDIR_TAG_SIGNATURE, ensure_cache_root
from .payload import CacheCorruptionWarning, load_state_dict_tensors, state_dict_tensors
from .store import Cache, Entry, EntryInfo
from .tables import table_from_data, table_to_data

__all__ = [
    "atomic_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "CACHEDIR_TAG_NAME",
    "CACHEDIR_TAG_SIGNATURE",
    "CACHE_MARKER_NAME",
    "Cache",
    "CacheCorruptionWarning",
    "Checkpoint",
    "CheckpointState",
    "Entry",
    "EntryInfo",
    "canonical_json",
    "canonical_settings",
    "ensure_cache_root",
    "load_state_dict_tensors",
    "settings_hash",
    "state_dict_tensors",
    "table_from_data",
    "table_to_data",
]
