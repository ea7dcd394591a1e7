"""Remote shard patterns -> shard URLs, checked at start-up, and their manifest counts.

Object stores and web servers cannot be globbed, so a pattern expands by braces
(`https://host/train-{000000..000063}.tar`), and a directory-like URL (`s3://b/prefix/`)
or a glob (`s3://b/prefix/train-*.tar`) is matched against the `manifest.json` in that
directory. The first shard (and the manifest, when one is read) is probed before any heavy
work, so a 404, a 403, missing credentials or an unreachable endpoint is one line, exit 2.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.data import cache
from pipeline.data.remote import (
    OBJECT_STORES,
    PIPE,
    FetchError,
    is_remote,
    path_of,
    scrub,
    was_scrubbed,
)
from pipeline.data.transfer import probe, read_small
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.format import ShardInfo

MANIFEST_NAME = "manifest.json"
# Which manifest split a directory-like URL means, by the key it was given for.
KEY_SPLITS = {"data.train": "train", "data.val": "val"}


def _parent(url: str) -> str:
    return path_of(url).rsplit("/", 1)[0] + "/"


def _manifest(directory: str, key: str) -> dict | None:
    url = directory + MANIFEST_NAME
    try:
        raw = read_small(url, cache.settings())
    except FetchError as exc:
        raise DataError(f"{key}: {exc}") from None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{key}: {scrub(url)}: malformed manifest ({exc})") from None


def _check_bucket(url: str, key: str) -> None:
    """For s3:// and gs://, a missing bucket explains a missing manifest better."""
    if not url.startswith(OBJECT_STORES):
        return
    scheme, rest = url.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    try:
        probe(bucket, cache.settings())
    except FetchError as exc:
        raise DataError(f"{key}: {scrub(url)}: bucket {exc}") from None


def _last_name(url: str) -> str:
    """The file name a pattern's wildcards may be in (`path_of`: no http query)."""
    return path_of(url).rsplit("/", 1)[-1]


def _listed(manifest: dict) -> dict[str, list[str]]:
    return {
        split: [entry["name"] for entry in body.get("shards", [])]
        for split, body in manifest.get("splits", {}).items()
    }


def expand_remote(pattern: str, key: str) -> list[str]:
    """Shard URLs of a remote pattern, in order; DataError (one line) when any check fails."""
    from braceexpand import braceexpand

    if was_scrubbed(pattern):
        raise DataError(
            f"{key}: {pattern}: its credentials were removed when a run wrote it down "
            "(config.yaml, a checkpoint); give the URL again, or keep credentials in the "
            "client's own files and variables (~/.netrc, AWS_*, ~/.aws)"
        )
    if pattern.startswith(PIPE):
        # As webdataset does, braces expand in commands too. The first command runs now (its
        # output is cached for the reader), so a failing one stops the run at start-up.
        commands = list(dict.fromkeys(braceexpand(pattern)))
        try:
            cache.shard_cache().ensure(commands[0])
        except FetchError as exc:
            raise DataError(f"{key}: {exc}") from None
        return sorted(commands)
    urls: list[str] = []
    for expanded in braceexpand(pattern):
        name = _last_name(expanded)
        if name and not any(c in name for c in "*?["):
            urls.append(expanded)
            continue
        directory = _parent(expanded)
        manifest = _manifest(directory, key)
        if manifest is None:
            _check_bucket(directory, key)
            raise DataError(
                f"{key}: {scrub(expanded)}: remote storage cannot be globbed and "
                f"{scrub(directory + MANIFEST_NAME)} does not exist; list the shards with braces "
                "(train-{000000..000009}.tar)"
            )
        splits = _listed(manifest)
        if name:
            names = sorted(
                n for names in splits.values() for n in names if fnmatch.fnmatch(n, name)
            )
        elif KEY_SPLITS.get(key) in splits:
            names = splits[KEY_SPLITS[key]]
        elif len(splits) == 1:
            (names,) = splits.values()
        else:
            raise DataError(
                f"{key}: {scrub(expanded)} holds splits {sorted(splits)}; name one, "
                f"e.g. {scrub(directory)}{sorted(splits)[0]}-*.tar"
            )
        urls.extend(directory + n for n in names)
    urls = sorted(dict.fromkeys(urls))  # as local patterns: the same shards, the same order
    if not urls:
        raise DataError(f"{key}: pattern '{scrub(pattern)}' matches no shards in its manifest")
    try:
        probe(urls[0], cache.settings())
    except FetchError as exc:
        raise DataError(f"{key}: {exc}") from None
    return urls


def remote_manifest_counts(urls: Sequence[str]) -> dict[str, ShardInfo]:
    """ShardInfo per URL from each directory's manifest.json (absent ones are skipped)."""
    from pipeline.data.format import ShardInfo

    found: dict[str, ShardInfo] = {}
    by_dir: dict[str, dict[str, ShardInfo]] = {}
    for url in urls:
        if url.startswith(PIPE) or not is_remote(url):
            continue
        directory = _parent(url)
        if directory not in by_dir:
            manifest = _manifest(directory, "manifest") or {}
            try:
                by_dir[directory] = {
                    entry["name"]: ShardInfo(**entry)
                    for split in manifest.get("splits", {}).values()
                    for entry in split.get("shards", [])
                }
            except (KeyError, TypeError) as exc:
                raise DataError(
                    f"{scrub(directory + MANIFEST_NAME)}: malformed manifest ({exc})"
                ) from None
        info = by_dir[directory].get(_last_name(url))
        if info is not None:
            found[url] = info
    return found
