"""The run: one training job from its configuration to its workdir.

- `config`: `Config`, every flag's value, checked against the rest before anything starts.
- `setup`: a `Run` from a config: mesh, data, model, optimizer, modes, compiled steps.
- `resume`: where a run starts: its latest checkpoint, checked, or a fresh state.
- `loop`: the one training loop: dispatches of steps, evaluation, checkpoints, signals.
- `pretrain`: a deep belief network's layers, each an ordinary run of an RBM, before its
  fine-tuning.
- `checkpoint`: Orbax checkpoints, their manifests, restoring a model or a teacher from them.
- `init_from`: ``--init-from``, a run that starts from another run's or PyTorch's weights.
- `workdir`: the run folder (config.json, resumes, what may be overwritten).
- `observe`: metrics lines, the metrics window, progress and profiling.
- `evaluation`: the test split's loss and accuracy; `signals`: SIGTERM and SIGINT saves;
  `distributed`: multi-process start-up and a lost peer.

This package imports, from the rest of jaxpar, only `jaxpar.core`, `jaxpar.cost`,
`jaxpar.models`, `jaxpar.data` and `jaxpar.modes`: the tools build on the run.
"""
