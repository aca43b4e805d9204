"""tools/bench/step_bench.py --profile: the step's time by kernel family."""
import torch

from tools.bench.step_bench import family, profile_step


def test_kernel_names_fall_in_their_family():
    assert family("aten::convolution_backward") == "convolution"
    assert family("sm90_xmma_fprop_implicit_gemm_f16f16") == "convolution"   # cuDNN kernel on a GPU
    assert family("aten::addmm") == "matmul"
    assert family("aten::native_batch_norm") == "normalisation"
    assert family("torchvision::roi_align") == "roi"
    assert family("aten::_foreach_add_") == "optimizer"
    assert family("aten::_softmax") == "reduction/softmax"
    assert family("aten::relu_") == "element-wise"
    assert family("aten::lerp") == "other"


def test_a_convolution_heavy_step_is_mostly_convolution():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])
    x = torch.randn(4, 32, 48, 48)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    prof = profile_step(step, "cpu", steps=2)
    assert abs(sum(prof["share"].values()) - 1) < 1e-3
    assert max(prof["share"], key=prof["share"].get) == "convolution" and prof["share"]["convolution"] > 0.5
    assert prof["ms_per_step"] > 0 and len(prof["top"]) <= 8
