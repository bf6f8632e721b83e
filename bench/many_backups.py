"""Copies one real backup's sidecar and summary 1,000 times under new ids,
with a sparse archive of the recorded size (so that listing finds each
whole, not damaged), for the listing benchmark:
many_backups.py <dir>/<id> <out dir>."""
import datetime
import json
import sys

src, out = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{src}.manifest.json"))
summary = json.load(open(f"{src}.summary.json"))
base = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
for i in range(1000):
    t = base + datetime.timedelta(minutes=i)
    ident = t.strftime("%Y-%m-%dT%H-%M-%S") + "_manual"
    stamp = t.isoformat().replace("+00:00", "Z")
    for doc in (manifest, summary):
        doc["id"], doc["trigger"], doc["timestamp"] = ident, "manual", stamp
    json.dump(manifest, open(f"{out}/{ident}.manifest.json", "w"))
    json.dump(summary, open(f"{out}/{ident}.summary.json", "w"))
    archive = manifest.get("archive")
    if archive:
        ext = {"gzip": "tar.gz", "zstd": "tar.zst"}[manifest["compression"]]
        with open(f"{out}/{ident}.{ext}", "wb") as f:
            f.truncate(archive["size_bytes"])
