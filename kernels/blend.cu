// Fused alpha blend for Kasmina seed slots:  y = h + alpha * s  (and its backward).
//
// alpha is read from device memory (a 0-d float32 tensor) so the host never has to
// read it back: the blend stays asynchronous with the training step.
// Half and bfloat16 values are carried as raw 16-bit patterns and converted with
// PTX / bit arithmetic, so the file compiles with NVRTC without any CUDA headers.
// All arithmetic is in float32 with one rounding to the storage type, like torch's
// addcmul on the same inputs.

__device__ __forceinline__ float f16_to_f32(unsigned short x) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(x));
    return f;
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short x;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(x) : "f"(f));
    return x;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short x) {
    return __uint_as_float(((unsigned int)x) << 16);
}

// Round to nearest even, NaN stays a (quiet) NaN: the rounding torch uses for bfloat16.
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// ---- float32 -------------------------------------------------------------------------

extern "C" __global__ void blend_fwd_f32(const float* __restrict__ h,
                                         const float* __restrict__ s,
                                         const float* __restrict__ alpha,
                                         float* __restrict__ y,
                                         long long n) {
    const float a = *alpha;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = fmaf(a, s[i], h[i]);
    }
}

// 16-byte vector loads and stores; every pointer must be 16-byte aligned. The n % 4
// tail is handled by the first threads of the grid.
extern "C" __global__ void blend_fwd_f32_vec4(const float* __restrict__ h,
                                              const float* __restrict__ s,
                                              const float* __restrict__ alpha,
                                              float* __restrict__ y,
                                              long long n) {
    const float a = *alpha;
    const long long n4 = n >> 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const float4* h4 = reinterpret_cast<const float4*>(h);
    const float4* s4 = reinterpret_cast<const float4*>(s);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (long long i = tid; i < n4; i += stride) {
        const float4 hv = h4[i];
        const float4 sv = s4[i];
        float4 out;
        out.x = fmaf(a, sv.x, hv.x);
        out.y = fmaf(a, sv.y, hv.y);
        out.z = fmaf(a, sv.z, hv.z);
        out.w = fmaf(a, sv.w, hv.w);
        y4[i] = out;
    }
    const long long tail = (n4 << 2) + tid;
    if (tail < n) {
        y[tail] = fmaf(a, s[tail], h[tail]);
    }
}

extern "C" __global__ void blend_bwd_seed_f32(const float* __restrict__ g,
                                              const float* __restrict__ alpha,
                                              float* __restrict__ gs,
                                              long long n) {
    const float a = *alpha;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        gs[i] = a * g[i];
    }
}

// ---- float16 -------------------------------------------------------------------------

extern "C" __global__ void blend_fwd_f16(const unsigned short* __restrict__ h,
                                         const unsigned short* __restrict__ s,
                                         const float* __restrict__ alpha,
                                         unsigned short* __restrict__ y,
                                         long long n) {
    const float a = *alpha;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = f32_to_f16(fmaf(a, f16_to_f32(s[i]), f16_to_f32(h[i])));
    }
}

extern "C" __global__ void blend_bwd_seed_f16(const unsigned short* __restrict__ g,
                                              const float* __restrict__ alpha,
                                              unsigned short* __restrict__ gs,
                                              long long n) {
    const float a = *alpha;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        gs[i] = f32_to_f16(a * f16_to_f32(g[i]));
    }
}

// ---- bfloat16 ------------------------------------------------------------------------

extern "C" __global__ void blend_fwd_bf16(const unsigned short* __restrict__ h,
                                          const unsigned short* __restrict__ s,
                                          const float* __restrict__ alpha,
                                          unsigned short* __restrict__ y,
                                          long long n) {
    const float a = *alpha;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = f32_to_bf16(fmaf(a, bf16_to_f32(s[i]), bf16_to_f32(h[i])));
    }
}

extern "C" __global__ void blend_bwd_seed_bf16(const unsigned short* __restrict__ g,
                                               const float* __restrict__ alpha,
                                               unsigned short* __restrict__ gs,
                                               long long n) {
    const float a = *alpha;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        gs[i] = f32_to_bf16(a * bf16_to_f32(g[i]));
    }
}
