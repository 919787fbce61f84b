import json
import os
import sys
import time

sys.path.insert(0, snakemake.config["scripts"])
from kneurons.devices import pick_device  # noqa: E402
from kneurons.logs import configure  # noqa: E402

configure(snakemake.log[0])
device = pick_device()
start = time.time()  # holding the lease from here to the process's end
leased = os.environ["CUDA_VISIBLE_DEVICES"]
time.sleep(float(snakemake.config.get("hold_s", 1.5)))
with open(snakemake.output[0], "w") as out:
    json.dump({"device": device, "gpu": leased, "start": start, "end": time.time(),
               "pid": os.getpid()}, out)
