import sys, resource, torch, vargrpo as vg
torch.set_num_threads(1)
B, ckpt = int(sys.argv[1]), sys.argv[2] == "1"
vae, var = vg.build_vae_var(vg.VARConfig.preset(sys.argv[3]))
var.grad_checkpointing = ckpt
g = torch.Generator().manual_seed(0)
labels, idx = torch.arange(B), torch.randint(0, 4096, (B, 680), generator=g)
vg.token_logprobs(var, labels, idx, 0.7).sum().backward()
print(B, int(ckpt), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
