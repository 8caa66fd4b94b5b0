import cProfile, pstats, time, io, torch
from kernels import flash_attn_func, layer_norm
B, S, H, D = 128, 197, 12, 64
q, k, v, do = [torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
for t in (q, k, v):
    t.requires_grad_()
x = torch.randn(B * S, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.ones(768, device="cuda", requires_grad=True)
b = torch.zeros(768, device="cuda", requires_grad=True)
gx = torch.randn_like(x)

def attn():
    torch.autograd.grad(flash_attn_func(q, k, v), (q, k, v), do)

def attn_fwd():
    flash_attn_func(q, k, v)

def ln():
    torch.autograd.grad(layer_norm(x, w, b), (x, w, b), gx)

def mm():
    torch.autograd.grad(torch.nn.functional.linear(x, w.new_ones(768, 768).bfloat16()), (x,), gx)

for name, fn in (("attn_fwd", attn_fwd), ("attn", attn), ("ln", ln), ("mm", mm)):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    host = (time.perf_counter() - t0) / 20 * 1e6
    torch.cuda.synchronize()
    print(f"== {name}: host {host:.0f} us/call")
    if name in ("attn", "ln"):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:6000])
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        print(s.getvalue()[:6000])
