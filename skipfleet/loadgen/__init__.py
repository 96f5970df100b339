"""A load generator of SIMULATED devices for benchmarking the coordinator. Not the agent.

Many simulated devices run in one process, driven from one asyncio loop (paho's external-loop
hooks, one MQTT connection per device); a benchmark spreads them over several processes.

What is real, exactly as the agent does it:
- the wire: shared.topics, shared.protocol envelopes stamped with a per-process boot id and a
  per-device seq, chunking and reassembly, QoS per topic kind, MQTT v5 persistent sessions;
- presence: retained `online` after every CONNACK, a retained `offline` Last Will (with a will
  delay), `offline` published before a clean disconnect;
- heartbeats with the agent's fields; the job life cycle (admission checks, one job at a time,
  SUCCEEDED / FAILED / REJECTED with IN_PROGRESS only for a job unfinished 5 s after it
  arrived, a report as its fine-tune's SUCCEEDED, cancel on arrival); evaluate, apply and
  rollback jobs; the retained desired pointer with its adapter inline and its offer answered
  as an APPLY_ADAPTER job, FetchRequest and AdapterPublication;
- the numbers: every process fine-tunes ONE real Skip2-LoRA adapter (agent.trainer.finetune) on
  real device data at start, and every accuracy a simulated device sends is a real hold-out
  evaluation of the adapter it names.

What is simulated (so that a 2-core machine can stand in for a thousand devices):
- a fine-tune job does not train: the device waits `--device-seconds` (default: the measured
  seconds of the process's one real run) without blocking the loop, then reports the
  process's reference adapter with a small seeded perturbation (one of the process's 64
  variants, picked per device and job, each evaluated once) and a per-device sample count;
  the reference was trained from the base model, not from the adapter the device runs;
- no on-disk spool or job history: paho keeps QoS 1 messages in memory, the job history lives
  in memory for the life of the process;
- energy follows the agent's model meter profile (idle watts all the time, active watts while a
  fine-tune "runs"); the drift score is computed once per process on its data.
"""
