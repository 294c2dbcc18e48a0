namespace RealAlign.Core.Imaging;

/// <summary>
/// <c>torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=False)</c> on
/// float32 CHW data, reproducing the weights of the CPU kernel that produced HPSv2's reference
/// outputs (Debian's torch 1.13.1 build, <c>UpSampleKernel.cpp</c> HelperInterpCubic +
/// <c>cpu_upsample_generic</c>). Its weights differ from current libtorch's by up to ~2e-5 (the
/// source index is kept at double precision before the lambda is rounded to float, and the cubic
/// polynomials are evaluated with fused multiply-adds), which is more than the golden tolerance,
/// so TorchSharp's own interpolate is not used here. Cubic coefficient A = −0.75; source index
/// scale·(i + 0.5) − 0.5 with scale = (float)in / out, not clamped; taps clamped to the border.
/// Checked against torch 1.13.1 (Debian python3-torch): weights agree to 1 ulp (one-hot inputs),
/// outputs on random [0, 1] images of random sizes to below 1e-6.
/// </summary>
public static class TorchBicubic
{
    private const float A = -0.75f;

    /// <summary>Resizes [channels, inH, inW] (row-major) to [channels, outH, outW].</summary>
    public static float[] Resize(float[] src, int channels, int inH, int inW, int outH, int outW)
    {
        if (src.LongLength != (long)channels * inH * inW)
            throw new ArgumentException($"expected {(long)channels * inH * inW} values for [{channels},{inH},{inW}], got {src.LongLength}");
        if (outH <= 0 || outW <= 0) throw new ArgumentException($"cannot resize to {outH}x{outW}");
        var (iy, wy) = Weights(inH, outH);
        var (ix, wx) = Weights(inW, outW);
        var dst = new float[(long)channels * outH * outW];
        for (int c = 0; c < channels; c++)
        {
            long inBase = (long)c * inH * inW, outBase = (long)c * outH * outW;
            for (int y = 0; y < outH; y++)
                for (int x = 0; x < outW; x++)
                {
                    // Interpolate<2>: outer sum over rows of inner sums over columns, accumulated as t*w + acc.
                    float acc = 0f;
                    for (int a = 0; a < 4; a++)
                    {
                        long row = inBase + (long)iy[y * 4 + a] * inW;
                        float inner = src[row + ix[x * 4]] * wx[x * 4];
                        for (int b = 1; b < 4; b++) inner = MathF.FusedMultiplyAdd(src[row + ix[x * 4 + b]], wx[x * 4 + b], inner);
                        acc = a == 0 ? inner * wy[y * 4] : MathF.FusedMultiplyAdd(inner, wy[y * 4 + a], acc);
                    }
                    dst[outBase + (long)y * outW + x] = acc;
                }
        }
        return dst;
    }

    private static (int[] Index, float[] Weight) Weights(int inSize, int outSize)
    {
        float scale = (float)inSize / outSize;
        var idx = new int[outSize * 4];
        var w = new float[outSize * 4];
        for (int i = 0; i < outSize; i++)
        {
            double real = scale * (i + 0.5) - 0.5;
            long input = (long)Math.Floor(real);
            float t = (float)(real - input);
            float x2 = 1f - t;
            w[i * 4] = Cubic2(t + 1f);
            w[i * 4 + 1] = Cubic1(t);
            w[i * 4 + 2] = Cubic1(x2);
            w[i * 4 + 3] = Cubic2(x2 + 1f);
            for (int j = 0; j < 4; j++) idx[i * 4 + j] = (int)Math.Clamp(input + j - 1, 0, inSize - 1);
        }
        return (idx, w);
    }

    // upsample cubic_convolution1/2 (UpSample.h) for |x| <= 1 and 1 < |x| < 2.
    private static float Cubic1(float x) => MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(A + 2, x, -(A + 3)) * x, x, 1f);

    private static float Cubic2(float x) =>
        MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(A, x, -5 * A), x, 8 * A), x, -4 * A);
}
