"""`sdrs serve` through webuiapi (AUTOMATIC1111's client library), then under load.

Usage: webuiapi_check.py SDRS_BINARY TINY_MODEL_FOLDER. Exits non-zero on the first failure.
"""

import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import requests
import webuiapi
from PIL import Image

SDRS, MODEL = sys.argv[1], sys.argv[2]
SMALL = dict(prompt="a lighthouse at dusk", steps=2, width=64, height=64, seed=7,
             sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.5)


def start(*extra):
    """Starts `sdrs serve` on a free port; returns the process and its address."""
    process = subprocess.Popen(
        [SDRS, "serve", "-m", f"tiny={MODEL}", "-m", f"other={MODEL}", "--port", "0",
         "--device", "cpu", "--dtype", "f32", *extra],
        stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("listening on http://"):
            host, port = line.strip().removeprefix("listening on http://").rsplit(":", 1)
            # Keep reading the log so that the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, host, int(port)
    raise SystemExit(f"sdrs serve did not start (exit {process.wait()})")


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def generated_pixels():
    """What `sdrs generate` writes for SMALL."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "out.png")
        subprocess.run([SDRS, "generate", "-m", MODEL, "-p", SMALL["prompt"], "--steps", "2",
                        "-W", "64", "-H", "64", "-s", "7", "--cfg-scale", "7.5",
                        "--device", "cpu", "--dtype", "f32", "-o", out],
                       check=True, capture_output=True)
        return Image.open(out).convert("RGB").tobytes()


def client_checks(host, port):
    api = webuiapi.WebUIApi(host=host, port=port)
    reference = generated_pixels()

    result = api.txt2img(**SMALL)
    check(result.image.size == (64, 64), "txt2img: the image decodes, 64x64")
    parameters = result.image.info.get("parameters", "")
    check("Seed: 7" in parameters and "Steps: 2" in parameters,
          "txt2img: the PNG carries the parameters chunk")
    check(result.info["all_seeds"] == [7] and result.parameters["seed"] == 7,
          "txt2img: info and parameters as AUTOMATIC1111 writes them")
    check(result.image.convert("RGB").tobytes() == reference,
          "txt2img: seed 7 gives the pixels of sdrs generate")

    body = {"prompt": SMALL["prompt"], "steps": 2, "seed": 7, "width": 64, "height": 64,
            "modelType": "tiny"}
    answer = requests.post(f"http://{host}:{port}/api/generate", json=body, timeout=60).json()
    image = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
    check(answer["seed"] == 7 and image.convert("RGB").tobytes() == reference,
          "/api/generate: the seed's body gives the pixels of sdrs generate")

    result = api.img2img(images=[result.image], denoising_strength=0.5, **SMALL)
    check(result.image.size == (64, 64)
          and "Denoising strength: 0.5" in result.image.info.get("parameters", ""),
          "img2img: an image with its parameters")

    check(api.util_get_model_names() == ["other", "tiny"], "sd-models: the aliases")
    api.util_set_model("other")
    check(api.util_get_current_model() == "other", "options: the model switched")
    check(api.txt2img(**SMALL).info["sd_model_name"] == "other",
          "txt2img: runs on the switched model")
    api.util_set_model("tiny")

    long_job = dict(SMALL, steps=10, n_iter=16)
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(result=api.txt2img(**long_job)))
    job.start()
    deadline = time.time() + 120
    progress = api.get_progress()
    while not (progress["state"]["sampling_step"] > 0 and progress["current_image"]):
        if time.time() > deadline:
            raise SystemExit("FAILED: progress: no step with a preview within 120 s")
        time.sleep(0.05)
        progress = api.get_progress()
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    check(0 < progress["progress"] < 1 and preview.size[0] > 0,
          f"progress: step {progress['state']['sampling_step']} of "
          f"{progress['state']['sampling_steps']}, with a live preview")
    api.interrupt()
    job.join()
    images = len(outcome["result"].images)
    check(outcome["result"].info["interrupted"] and images < 16,
          f"interrupt: the job stopped after {images} of 16 images")
    api.util_wait_for_ready(check_interval=0.1)
    print("ok: util_wait_for_ready returns once the queue is empty")


def load_test(host, port, pid):
    url = f"http://{host}:{port}/sdapi/v1/txt2img"
    clients = 64
    results = [None] * clients
    barrier = threading.Barrier(clients)

    def client(index):
        body = dict(SMALL, prompt=f"load {index}", seed=1000 + index)
        barrier.wait()
        response = requests.post(url, json=body, timeout=300)
        results[index] = response

    before = memory_kib(pid, "VmRSS")
    started = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.time() - started
    served = [i for i, r in enumerate(results) if r.status_code == 200]
    refused = [i for i, r in enumerate(results) if r.status_code == 503]
    check(len(served) + len(refused) == clients,
          f"load: every client got an image or a 503 ({len(served)} images, {len(refused)} 503s)")
    check(all(results[i].headers.get("Retry-After", "").isdigit() for i in refused),
          "load: every 503 carries Retry-After")
    for i in served:
        info = json.loads(results[i].json()["info"])
        image = Image.open(io.BytesIO(base64.b64decode(results[i].json()["images"][0])))
        if info["prompt"] != f"load {i}" or info["all_seeds"] != [1000 + i] \
                or f"Seed: {1000 + i}" not in image.info["parameters"]:
            raise SystemExit(f"FAILED: load: client {i} got another request's image")
    print("ok: load: each image is its own request's (none lost, none duplicated)")
    queue = requests.get(f"http://{host}:{port}/api/queue", timeout=10).json()
    check(queue["finished"] >= len(served), f"load: {queue['finished']} jobs ran in all")
    after = memory_kib(pid, "VmRSS")
    peak = memory_kib(pid, "VmHWM")
    print(f"load figures: {clients} clients, queue 8, {seconds:.1f} s; {len(served)} images, "
          f"{len(refused)} refused; server RSS {before // 1024} MiB before, {after // 1024} MiB "
          f"after, peak {peak // 1024} MiB")
    check(peak < 2 * 1024 * 1024, "load: the server's peak memory stays under 2 GiB")
    again = requests.post(url, json=SMALL, timeout=60)
    check(again.status_code == 200, "load: the server serves normally afterwards")


def main():
    process, host, port = start("--queue", "8")
    try:
        client_checks(host, port)
        load_test(host, port, process.pid)
    finally:
        process.kill()
        process.wait()
    print("webuiapi and load checks passed")


main()
