"""The public ops: argument checks, the torch.library registration (``torch.ops.ds_kernels.*``,
with fake and autograd implementations), and the dispatch to a backend. One file per op."""
