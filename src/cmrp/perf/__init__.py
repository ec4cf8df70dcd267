"""Performance accounting: FLOPs from the architecture (`flops`), per-GPU memory estimates (`memory`,
`model`, `plan`: `cmrp plan`), live tensor-memory measurement (`memtrack`), the device's measured peak
(`device`) and synthetic workloads for benchmarks (`workload`). Import the submodules (they need torch)."""
