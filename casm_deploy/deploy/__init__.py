"""The mapping outside training: the exported file, the exporters, the runtimes, `infer`."""
