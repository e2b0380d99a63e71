// The UNet's heavy operations on the CPU through oneDNN, for `model::onednn`: 2-D
// convolution (forward, input gradient, weight + bias gradient), SiLU (oneDNN's swish) and
// the normalisation core of GroupNorm (forward and input gradient).
//
// Written by hand because no kept Rust crate binds oneDNN (the crates.io bindings are 0.0.x
// stubs), and the C++ API (dnnl.hpp) is far shorter and safer to drive than the C API's
// by-value descriptor structs across FFI. The Rust side sees seven functions over plain
// NCHW / OIHW float buffers and shapes; everything oneDNN-specific stays here: primitives
// are created once per shape and cached, they pick their own (blocked) layouts, and buffers
// are reordered into and out of them on each call.
#include <oneapi/dnnl/dnnl.hpp>
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

extern "C" {
struct ei_conv_geometry {
    int64_t batch, in_channels, height, width, out_channels, kernel, stride, padding;
};
}

namespace {
using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

// At most this many primitives per kind of operation (`PRIMITIVE_CACHE_CAPACITY` on the
// Rust side): a training run has a handful of shapes, but a process that sees many (frames
// of many sizes) must not grow without bound.
constexpr size_t kCacheCapacity = 64;

// The entries of all caches together, for `ei_cached_primitives`.
std::atomic<int64_t> cached_total{0};

// A cache of primitives built once per key, the least recently used dropped beyond
// kCacheCapacity. An entry in use elsewhere survives its eviction (shared_ptr), and
// primitives with caller-owned scratchpads are safe to execute from several threads at once.
template <typename Key, typename Value, typename Build>
std::shared_ptr<const Value> cached(const Key& key, Build&& build) {
    struct Entry {
        std::shared_ptr<const Value> value;
        uint64_t used;
    };
    static std::mutex lock;
    static std::map<Key, Entry> cache;
    static uint64_t clock = 0;
    std::lock_guard<std::mutex> guard(lock);
    auto found = cache.find(key);
    if (found != cache.end()) {
        found->second.used = ++clock;
        return found->second.value;
    }
    if (cache.size() >= kCacheCapacity) {
        // A linear scan over at most kCacheCapacity entries, only when a new shape arrives.
        auto oldest = cache.begin();
        for (auto it = cache.begin(); it != cache.end(); ++it) {
            if (it->second.used < oldest->second.used) oldest = it;
        }
        cache.erase(oldest);
        --cached_total;
    }
    auto made = std::make_shared<const Value>(build());
    cache.emplace(key, Entry{made, ++clock});
    ++cached_total;
    return made;
}

engine& cpu_engine() {
    static engine e(engine::kind::cpu, 0);
    return e;
}

// Every primitive takes its scratchpad from the caller: the library-managed one is shared
// between primitives and unsafe when threads (parallel tests, say) execute them at once.
const primitive_attr& user_scratchpad() {
    static const primitive_attr attr = [] {
        primitive_attr a;
        a.set_scratchpad_mode(scratchpad_mode::user);
        return a;
    }();
    return attr;
}

// The three primitives of one convolution geometry and the plain layouts the caller uses.
struct Convolution {
    memory::desc src, weights, bias, dst;
    convolution_forward::primitive_desc forward_pd;
    convolution_backward_data::primitive_desc backward_data_pd;
    convolution_backward_weights::primitive_desc backward_weights_pd;
    convolution_forward forward;
    convolution_backward_data backward_data;
    convolution_backward_weights backward_weights;
};

Convolution build_convolution(const ei_conv_geometry& g) {
    const int64_t out_h = (g.height + 2 * g.padding - g.kernel) / g.stride + 1;
    const int64_t out_w = (g.width + 2 * g.padding - g.kernel) / g.stride + 1;
    const memory::dims src{g.batch, g.in_channels, g.height, g.width};
    const memory::dims weights{g.out_channels, g.in_channels, g.kernel, g.kernel};
    const memory::dims bias{g.out_channels};
    const memory::dims dst{g.batch, g.out_channels, out_h, out_w};
    const memory::dims strides{g.stride, g.stride}, padding{g.padding, g.padding};
    // `any`: the primitives choose their layouts (blocked on AVX-512 machines).
    const memory::desc src_any(src, dt::f32, tag::any), weights_any(weights, dt::f32, tag::any),
        bias_md(bias, dt::f32, tag::x), dst_any(dst, dt::f32, tag::any);
    auto& eng = cpu_engine();
    auto forward_pd = convolution_forward::primitive_desc(
        convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct, src_any,
                                  weights_any, bias_md, dst_any, strides, padding, padding),
        user_scratchpad(), eng);
    auto backward_data_pd = convolution_backward_data::primitive_desc(
        convolution_backward_data::desc(algorithm::convolution_direct, src_any, weights_any, dst_any,
                                        strides, padding, padding),
        user_scratchpad(), eng, forward_pd);
    auto backward_weights_pd = convolution_backward_weights::primitive_desc(
        convolution_backward_weights::desc(algorithm::convolution_direct, src_any, weights_any, bias_md,
                                           dst_any, strides, padding, padding),
        user_scratchpad(), eng, forward_pd);
    return Convolution{
        memory::desc(src, dt::f32, tag::nchw), memory::desc(weights, dt::f32, tag::oihw), bias_md,
        memory::desc(dst, dt::f32, tag::nchw), forward_pd, backward_data_pd, backward_weights_pd,
        convolution_forward(forward_pd), convolution_backward_data(backward_data_pd),
        convolution_backward_weights(backward_weights_pd)};
}

std::shared_ptr<const Convolution> convolution_for(const ei_conv_geometry& g) {
    using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
    const Key key{g.batch, g.in_channels, g.height, g.width, g.out_channels, g.kernel, g.stride, g.padding};
    return cached<Key, Convolution>(key, [&] { return build_convolution(g); });
}

// SiLU over `elements` values: oneDNN's swish with alpha 1, x·sigmoid(x).
struct Swish {
    memory::desc data;
    eltwise_forward::primitive_desc forward_pd;
    eltwise_backward::primitive_desc backward_pd;
    eltwise_forward forward;
    eltwise_backward backward;
};

std::shared_ptr<const Swish> swish_for(int64_t elements) {
    return cached<int64_t, Swish>(elements, [&] {
        const memory::desc data({elements}, dt::f32, tag::a);
        auto forward_pd = eltwise_forward::primitive_desc(
            eltwise_forward::desc(prop_kind::forward_training, algorithm::eltwise_swish, data, 1.f, 0.f),
            user_scratchpad(), cpu_engine());
        auto backward_pd = eltwise_backward::primitive_desc(
            eltwise_backward::desc(algorithm::eltwise_swish, data, data, 1.f, 0.f), user_scratchpad(),
            cpu_engine(), forward_pd);
        return Swish{data, forward_pd, backward_pd, eltwise_forward(forward_pd), eltwise_backward(backward_pd)};
    });
}

// GroupNorm without its affine part: every (sample, group) run of `length` contiguous
// values normalised by its own mean and biased variance. That is batch normalisation in
// training mode of the [1, runs, length, 1] view, which oneDNN has (it has no group
// normalisation before 3.3).
struct Normalisation {
    memory::desc data, statistics;
    batch_normalization_forward::primitive_desc forward_pd;
    batch_normalization_backward::primitive_desc backward_pd;
    batch_normalization_forward forward;
    batch_normalization_backward backward;
};

std::shared_ptr<const Normalisation> normalisation_for(int64_t runs, int64_t length, float epsilon) {
    using Key = std::tuple<int64_t, int64_t, float>;
    return cached<Key, Normalisation>(Key{runs, length, epsilon}, [&] {
        const memory::desc data({1, runs, length, 1}, dt::f32, tag::nchw);
        const memory::desc statistics({runs}, dt::f32, tag::a);
        auto forward_pd = batch_normalization_forward::primitive_desc(
            batch_normalization_forward::desc(prop_kind::forward_training, data, epsilon, normalization_flags::none),
            user_scratchpad(), cpu_engine());
        auto backward_pd = batch_normalization_backward::primitive_desc(
            batch_normalization_backward::desc(prop_kind::backward_data, data, data, epsilon, normalization_flags::none),
            user_scratchpad(), cpu_engine(), forward_pd);
        return Normalisation{data, statistics, forward_pd, backward_pd, batch_normalization_forward(forward_pd),
                             batch_normalization_backward(backward_pd)};
    });
}

// One primitive call: inputs are reordered into the primitive's layouts, outputs computed in
// its layouts and reordered back into the caller's buffers.
class Call {
public:
    explicit Call(int threads) : stream_(cpu_engine()) { omp_set_num_threads(threads); }

    void input(int arg, const memory::desc& user, const memory::desc& wanted, const float* data) {
        memory given(user, cpu_engine(), const_cast<float*>(data));
        if (user == wanted) {
            args_[arg] = given;
            return;
        }
        memory converted(wanted, cpu_engine());
        reordered(given, converted);
        args_[arg] = converted;
    }

    void output(int arg, const memory::desc& user, const memory::desc& wanted, float* data) {
        memory target(user, cpu_engine(), data);
        if (user == wanted) {
            args_[arg] = target;
            return;
        }
        memory computed(wanted, cpu_engine());
        args_[arg] = computed;
        back_.emplace_back(computed, target);
    }

    template <typename PrimitiveDesc>
    void run(const primitive& p, const PrimitiveDesc& pd) {
        args_[DNNL_ARG_SCRATCHPAD] = memory(pd.scratchpad_desc(), cpu_engine());
        p.execute(stream_, args_);
        for (auto& [computed, target] : back_) reordered(computed, target);
        stream_.wait();
    }

private:
    void reordered(const memory& from, const memory& to) {
        const reorder::primitive_desc pd(from, to, user_scratchpad());
        memory scratchpad(pd.scratchpad_desc(), cpu_engine());
        reorder(pd).execute(stream_, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    }

    stream stream_;
    std::unordered_map<int, memory> args_;
    std::vector<std::pair<memory, memory>> back_;
};

// Copies `text` into the caller's buffer of `error_len` bytes, always NUL-terminated.
void message(char* error, size_t error_len, const char* text) {
    if (error_len == 0) return;
    std::strncpy(error, text, error_len - 1);
    error[error_len - 1] = '\0';
}

// Runs `body`, turning any exception into a return of 1 and a message.
template <typename F>
int guarded(char* error, size_t error_len, F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        message(error, error_len, e.what());
        return 1;
    } catch (...) {
        // Nothing may unwind into Rust: that is undefined behaviour.
        message(error, error_len, "an exception that is not a std::exception");
        return 1;
    }
}
}  // namespace

extern "C" {
int ei_conv_forward(const ei_conv_geometry* g, int threads, const float* src, const float* weights,
                    const float* bias, float* dst, char* error, size_t error_len) {
    return guarded(error, error_len, [&] {
        auto c = convolution_for(*g);
        Call call(threads);
        call.input(DNNL_ARG_SRC, c->src, c->forward_pd.src_desc(), src);
        call.input(DNNL_ARG_WEIGHTS, c->weights, c->forward_pd.weights_desc(), weights);
        call.input(DNNL_ARG_BIAS, c->bias, c->forward_pd.bias_desc(), bias);
        call.output(DNNL_ARG_DST, c->dst, c->forward_pd.dst_desc(), dst);
        call.run(c->forward, c->forward_pd);
    });
}

int ei_conv_backward_data(const ei_conv_geometry* g, int threads, const float* diff_dst,
                          const float* weights, float* diff_src, char* error, size_t error_len) {
    return guarded(error, error_len, [&] {
        auto c = convolution_for(*g);
        Call call(threads);
        call.input(DNNL_ARG_DIFF_DST, c->dst, c->backward_data_pd.diff_dst_desc(), diff_dst);
        call.input(DNNL_ARG_WEIGHTS, c->weights, c->backward_data_pd.weights_desc(), weights);
        call.output(DNNL_ARG_DIFF_SRC, c->src, c->backward_data_pd.diff_src_desc(), diff_src);
        call.run(c->backward_data, c->backward_data_pd);
    });
}

int ei_conv_backward_weights(const ei_conv_geometry* g, int threads, const float* src,
                             const float* diff_dst, float* diff_weights, float* diff_bias, char* error,
                             size_t error_len) {
    return guarded(error, error_len, [&] {
        auto c = convolution_for(*g);
        Call call(threads);
        call.input(DNNL_ARG_SRC, c->src, c->backward_weights_pd.src_desc(), src);
        call.input(DNNL_ARG_DIFF_DST, c->dst, c->backward_weights_pd.diff_dst_desc(), diff_dst);
        call.output(DNNL_ARG_DIFF_WEIGHTS, c->weights, c->backward_weights_pd.diff_weights_desc(), diff_weights);
        call.output(DNNL_ARG_DIFF_BIAS, c->bias, c->backward_weights_pd.diff_bias_desc(), diff_bias);
        call.run(c->backward_weights, c->backward_weights_pd);
    });
}

int ei_swish_forward(int64_t elements, int threads, const float* src, float* dst, char* error, size_t error_len) {
    return guarded(error, error_len, [&] {
        auto p = swish_for(elements);
        Call call(threads);
        call.input(DNNL_ARG_SRC, p->data, p->forward_pd.src_desc(), src);
        call.output(DNNL_ARG_DST, p->data, p->forward_pd.dst_desc(), dst);
        call.run(p->forward, p->forward_pd);
    });
}

int ei_swish_backward(int64_t elements, int threads, const float* src, const float* diff_dst, float* diff_src,
                      char* error, size_t error_len) {
    return guarded(error, error_len, [&] {
        auto p = swish_for(elements);
        Call call(threads);
        call.input(DNNL_ARG_SRC, p->data, p->backward_pd.src_desc(), src);
        call.input(DNNL_ARG_DIFF_DST, p->data, p->backward_pd.diff_dst_desc(), diff_dst);
        call.output(DNNL_ARG_DIFF_SRC, p->data, p->backward_pd.diff_src_desc(), diff_src);
        call.run(p->backward, p->backward_pd);
    });
}

int ei_normalise_forward(int64_t runs, int64_t length, float epsilon, int threads, const float* src, float* dst,
                         float* mean, float* variance, char* error, size_t error_len) {
    return guarded(error, error_len, [&] {
        auto p = normalisation_for(runs, length, epsilon);
        Call call(threads);
        call.input(DNNL_ARG_SRC, p->data, p->forward_pd.src_desc(), src);
        call.output(DNNL_ARG_DST, p->data, p->forward_pd.dst_desc(), dst);
        call.output(DNNL_ARG_MEAN, p->statistics, p->forward_pd.mean_desc(), mean);
        call.output(DNNL_ARG_VARIANCE, p->statistics, p->forward_pd.variance_desc(), variance);
        call.run(p->forward, p->forward_pd);
    });
}

int ei_normalise_backward(int64_t runs, int64_t length, float epsilon, int threads, const float* src,
                          const float* mean, const float* variance, const float* diff_dst, float* diff_src,
                          char* error, size_t error_len) {
    return guarded(error, error_len, [&] {
        auto p = normalisation_for(runs, length, epsilon);
        Call call(threads);
        call.input(DNNL_ARG_SRC, p->data, p->backward_pd.src_desc(), src);
        call.input(DNNL_ARG_MEAN, p->statistics, p->backward_pd.mean_desc(), mean);
        call.input(DNNL_ARG_VARIANCE, p->statistics, p->backward_pd.variance_desc(), variance);
        call.input(DNNL_ARG_DIFF_DST, p->data, p->backward_pd.diff_dst_desc(), diff_dst);
        call.output(DNNL_ARG_DIFF_SRC, p->data, p->backward_pd.diff_src_desc(), diff_src);
        call.run(p->backward, p->backward_pd);
    });
}

int64_t ei_cached_primitives() { return cached_total.load(); }
}
