"""The in-process engine's capabilities, one module each, composed by :class:`~splitnn.workers.VirtualWorker`.

Each module holds one capability as a mixin of the engine (its state is listed in its ``_init_*`` method):
segments and probes (:mod:`.segments`), codecs at the cuts (:mod:`.codecs`), held datasets and the holder's
draw (:mod:`.datasets`), the tensor store and transfers between parties (:mod:`.store`), forward, backward
and step (:mod:`.steps`), merged inputs (:mod:`.merged`), losses and metrics (:mod:`.scoring`), pipelined
batches in flight (:mod:`.pipelined`), state transfer and averaging (:mod:`.states`), checkpoints
(:mod:`.checkpoints`), private set intersection (:mod:`.intersection`), and the policy's release gate and
hijack guard (:mod:`.gate`). :mod:`.hosted` is the record of one hosted segment.
"""
