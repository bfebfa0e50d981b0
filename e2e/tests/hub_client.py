"""The official `huggingface_hub` client, as a user runs it, against the Hub double.

Usage: hub_client.py download REPO REVISION CACHE_DIR   -> prints the snapshot's path
       hub_client.py upload REPO FOLDER                  -> prints the commit id
       hub_client.py tensors DIR                         -> prints {name: [shape, dtype, sha256]}
                                                            over every *.safetensors in DIR
HF_ENDPOINT and HF_TOKEN say where and as whom; Xet is off, as the double speaks LFS.
"""
import hashlib
import json
import os
import sys

os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def download(repo, revision, cache_dir):
    from huggingface_hub import snapshot_download

    print(snapshot_download(repo, revision=revision, cache_dir=cache_dir))


def upload(repo, folder):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="Upload from Python")
    print(info.oid)


def tensors(directory):
    from safetensors.numpy import load_file

    found = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            assert header.get("__metadata__", {}).get("format") == "pt", name
            for key, value in load_file(os.path.join(directory, name)).items():
                assert key not in found, f"{key} in two shards"
                digest = hashlib.sha256(value.tobytes()).hexdigest()
                found[key] = [list(value.shape), str(value.dtype), digest]
    print(json.dumps(found, sort_keys=True))


if __name__ == "__main__":
    {"download": download, "upload": upload, "tensors": tensors}[sys.argv[1]](*sys.argv[2:])
