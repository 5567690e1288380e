// ramp-cpp native helper: a thin C ABI over the libllama.so that llama-cpp-python ships, loaded from
// Python with ctypes so quantization and evaluation run through one and the same llama.cpp build.
//
// Why C++ at all: llama_model_quantize needs NUL-terminated arrays of C structs kept alive for the whole
// call, its errors only reach the log callback, and row-level quantization (ggml_quantize_chunk) is
// the primitive the tensor cache of the search is built from. The activation-statistics collector is
// llama.cpp's eval callback: it runs inside llama_decode for every matrix multiplication, so it must be
// native code (a Python callback would take the GIL ~200 times per decoded batch).

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(_WIN32)
#define RAMP_API extern "C" __declspec(dllexport)
#else
#define RAMP_API extern "C" __attribute__((visibility("default")))
#endif

struct ramp_type_entry {
    const char * name;  // exact tensor name, e.g. "blk.1.attn_q.weight"
    int32_t      type;  // enum ggml_type
};

struct ramp_imatrix_entry {
    const char *  name;  // tensor name
    const float * data;  // mean of x^2 per input column (sum / count), as llama-quantize passes it
    size_t        size;
};

namespace {

std::mutex  g_log_mutex;
std::string g_log_tail;

void capture_log(ggml_log_level level, const char * text, void * /*user_data*/) {
    if (level != GGML_LOG_LEVEL_ERROR && level != GGML_LOG_LEVEL_WARN) {
        return;
    }
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log_tail += text;
    if (g_log_tail.size() > 4096) {
        g_log_tail.erase(0, g_log_tail.size() - 4096);
    }
}

// llama.cpp matches override patterns with std::regex_search; anchoring and escaping makes the
// map exact, so "blk.1.attn_q.weight" can never also match "blk.11.attn_q.weight".
std::string anchored_pattern(const char * name) {
    static const char * special = R"(\^$.|?*+()[]{})";
    std::string out = "^";
    for (const char * p = name; *p; ++p) {
        if (std::strchr(special, *p)) {
            out += '\\';
        }
        out += *p;
    }
    out += '$';
    return out;
}

void set_err(char * err, size_t err_len, const std::string & msg) {
    if (err && err_len) {
        std::snprintf(err, err_len, "%s", msg.c_str());
    }
}

}  // namespace

// Quantize fname_inp into fname_out. Tensors named in `map` get exactly that type (llama.cpp then
// applies its row-length fallback); every other quantizable tensor gets ftype's default type when
// `pure` is set, or llama.cpp's own mixture rules for that ftype otherwise.
// Returns 0 on success; on failure, non-zero with the tail of llama.cpp's error log in `err`.
RAMP_API int ramp_quantize_model(const char * fname_inp, const char * fname_out, int32_t ftype, int32_t pure,
                                 const ramp_type_entry * map, int32_t n_map, const ramp_imatrix_entry * imatrix,
                                 int32_t n_imatrix, int32_t nthread, int32_t allow_requantize, char * err,
                                 size_t err_len) {
    std::vector<std::string>                     patterns(n_map);
    std::vector<llama_model_tensor_override>     overrides;
    std::vector<llama_model_imatrix_data>        imat;
    overrides.reserve(n_map + 1);
    for (int32_t i = 0; i < n_map; ++i) {
        patterns[i] = anchored_pattern(map[i].name);
        overrides.push_back({ patterns[i].c_str(), (ggml_type) map[i].type });
    }
    overrides.push_back({ nullptr, GGML_TYPE_COUNT });
    for (int32_t i = 0; i < n_imatrix; ++i) {
        imat.push_back({ imatrix[i].name, imatrix[i].data, imatrix[i].size });
    }
    imat.push_back({ nullptr, nullptr, 0 });

    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.nthread          = nthread;
    params.ftype            = (llama_ftype) ftype;
    params.pure             = pure != 0;
    params.allow_requantize = allow_requantize != 0;
    params.tt_overrides     = n_map > 0 ? overrides.data() : nullptr;
    params.imatrix          = n_imatrix > 0 ? imat.data() : nullptr;

    ggml_log_callback prev_cb   = nullptr;
    void *            prev_data = nullptr;
    llama_log_get(&prev_cb, &prev_data);
    {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        g_log_tail.clear();
    }
    llama_log_set(capture_log, nullptr);
    uint32_t rc = 1;
    try {
        rc = llama_model_quantize(fname_inp, fname_out, &params);
    } catch (const std::exception & e) {
        set_err(err, err_len, e.what());
        llama_log_set(prev_cb, prev_data);
        return 1;
    }
    llama_log_set(prev_cb, prev_data);
    if (rc != 0) {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        set_err(err, err_len, g_log_tail);
    }
    return (int) rc;
}

// Quantize `nrows` rows of `n_per_row` floats into `dst` with ggml's reference quantizer, the same
// call llama_model_quantize makes per chunk. Returns the bytes written.
RAMP_API size_t ramp_quantize_rows(int32_t type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                                   const float * imatrix) {
    return ggml_quantize_chunk((ggml_type) type, src, dst, 0, nrows, n_per_row, imatrix);
}

RAMP_API size_t ramp_row_size(int32_t type, int64_t n_per_row) {
    return ggml_row_size((ggml_type) type, n_per_row);
}

// ---------------------------------------------------------------------------------------------------
// Activation statistics through llama.cpp's eval callback (ggml_backend_sched_eval_callback), the hook
// tools/imatrix/imatrix.cpp uses: for every GGML_OP_MUL_MAT whose src0 is a model weight, accumulate per
// input column j of src1 (the input x, one row per token):
//     max_abs[j] = max over rows |x[j]|,   sum_sq[j] += x[j]^2 (in double),   rows += number of rows.
// Weights are recognised by name as llama-imatrix does (blk.N.*.weight), plus output.weight and
// token_embd.weight, which only meet MUL_MAT as the output head (the embedding lookup is GET_ROWS).
// A GGML_OP_MUL_MAT_ID on an expert tensor (3-D, n_expert slices; src[2] the ids of the experts each token
// was routed to) accumulates the same sums per expert, each over the rows routed to that expert, and counts
// those rows, as imatrix.cpp does for its per-expert entries; `rows` stays the tokens seen. A collector
// handles MUL_MAT_ID only once ramp_stats_experts turned it on, so code that predates it (and sizes every
// entry as one row of `width`) never meets an expert entry.

namespace {

struct stats_entry {
    std::string          name;
    int64_t              width    = 0;  // input columns, src1->ne[0]
    int64_t              n_expert = 0;  // an expert tensor's experts (src0->ne[2]); 0 for a MUL_MAT weight
    int64_t              rows     = 0;  // rows of x seen (tokens)
    // width values, or n_expert x width (expert-major) for an expert tensor
    std::vector<float>   max_abs;
    std::vector<double>  sum_sq;
    std::vector<double>  rel_sq;  // sum over rows of x[j]^2 / ms(h), h the residual row of the same token
    int64_t              rel_rows = 0;
    std::vector<int64_t> counts;  // rows routed to each expert (expert tensors)
};

struct stats_collector {
    std::mutex                              mutex;
    std::vector<stats_entry>                entries;  // first-seen (graph) order
    std::unordered_map<std::string, size_t> index;
    std::vector<char>                       host_copy;  // src1 copied out of device memory
    std::string                             error;      // first problem seen; collection continues
    std::vector<std::string>                watch;      // graph-node name prefixes recorded besides weights
    std::vector<std::string>                residual;   // watched prefixes that are the residual stream
    std::vector<double>                     ms;         // mean square of each row of the last residual node
    std::vector<char>                       ids_copy;   // a MUL_MAT_ID's expert ids, copied to the host
    bool                                    experts = false;  // handle MUL_MAT_ID (ramp_stats_experts)
};

// "CUDA0#blk.0.attn_k.weight#0" (a scheduler copy) -> "blk.0.attn_k.weight", as imatrix.cpp's
// filter_tensor_name does.
std::string weight_name(const char * name) {
    const char * p = std::strchr(name, '#');
    if (!p) {
        return name;
    }
    ++p;
    const char * q = std::strchr(p, '#');
    return q ? std::string(p, q - p) : std::string(p);
}

bool is_weight(const std::string & n) {
    static const std::string suffix = ".weight";
    const bool ends = n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
    return ends && (n.rfind("blk.", 0) == 0 || n == "output.weight" || n == "token_embd.weight");
}

}  // namespace

RAMP_API void * ramp_stats_new(void) {
    return new stats_collector();
}

RAMP_API void ramp_stats_free(void * c) {
    delete static_cast<stats_collector *>(c);
}

RAMP_API void ramp_stats_reset(void * c) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    s->entries.clear();
    s->index.clear();
    s->error.clear();
    s->ms.clear();
}

// The eval callback: pass its address as llama_context_params.cb_eval and the collector as
// cb_eval_user_data. With ask=true the scheduler asks whether we want a node's result (it then splits the
// graph after that node); with ask=false the node has been computed and its inputs are readable.
namespace {

// The host address of `x`'s data: the tensor itself, or a copy into `buf` when it sits in device memory.
const char * host_data(const ggml_tensor * x, std::vector<char> & buf) {
    if (ggml_backend_buffer_is_host(x->buffer)) {
        return static_cast<const char *>(x->data);
    }
    buf.resize(ggml_nbytes(x));
    ggml_backend_tensor_get(x, buf.data(), 0, buf.size());
    return buf.data();
}

// The entry `name` of `width` columns and `n_expert` experts (0: a 2-D weight), created when first met; null
// (and the collector's error set) when an earlier batch met it with another shape.
stats_entry * entry(stats_collector * s, const std::string & name, int64_t width, int64_t n_expert) {
    auto it = s->index.find(name);
    if (it == s->index.end()) {
        it = s->index.emplace(name, s->entries.size()).first;
        stats_entry   e;
        const int64_t n = width * std::max<int64_t>(1, n_expert);
        e.name          = name;
        e.width         = width;
        e.n_expert      = n_expert;
        e.max_abs.assign(n, 0.0f);
        e.sum_sq.assign(n, 0.0);
        e.rel_sq.assign(n, 0.0);
        e.counts.assign(n_expert, 0);
        s->entries.push_back(std::move(e));
    }
    stats_entry & e = s->entries[it->second];
    if (e.width != width || e.n_expert != n_expert) {
        if (s->error.empty()) {
            s->error = name + " seen as " + std::to_string(e.n_expert) + " experts x " + std::to_string(e.width) +
                       " columns and as " + std::to_string(n_expert) + " x " + std::to_string(width);
        }
        return nullptr;
    }
    return &e;
}

// Accumulate x = the rows of `x` (F32, one row per token) into the entry `name`. With `residual`, x is the
// residual stream: each row's mean square is kept, and the rows of the weights' inputs that follow (the same
// tokens, until the next residual node) are also summed divided by it (rel_sq).
void accumulate(stats_collector * s, const std::string & name, const ggml_tensor * x, bool residual) {
    if (x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float)) {
        if (s->error.empty()) {
            s->error = "input of " + name + " is " + ggml_type_name(x->type) + ", not contiguous F32";
        }
        return;
    }
    const char *  data = host_data(x, s->host_copy);
    const int64_t ne0 = x->ne[0];
    stats_entry * ep  = entry(s, name, ne0, 0);
    if (!ep) {
        return;
    }
    stats_entry & e = *ep;
    const int64_t n_rows = x->ne[1] * x->ne[2] * x->ne[3];
    // the residual rows of the same tokens (a row count that differs, e.g. the last block's output rows only,
    // leaves rel_sq out for this batch)
    const bool    rel    = !residual && (int64_t) s->ms.size() == n_rows;
    if (residual) {
        s->ms.assign(n_rows, 0.0);
    }
    float *  mx  = e.max_abs.data();
    double * sq  = e.sum_sq.data();
    double * rsq = e.rel_sq.data();
    int64_t  row = 0;
    for (int64_t i3 = 0; i3 < x->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < x->ne[2]; ++i2) {
            for (int64_t i1 = 0; i1 < x->ne[1]; ++i1, ++row) {
                const auto * r = reinterpret_cast<const float *>(data + i1 * x->nb[1] + i2 * x->nb[2] + i3 * x->nb[3]);
                double       row_sq = 0.0;
                for (int64_t j = 0; j < ne0; ++j) {
                    const float v = r[j];
                    mx[j]         = std::max(mx[j], std::fabs(v));
                    sq[j] += (double) v * (double) v;
                    row_sq += (double) v * (double) v;
                }
                if (residual) {
                    s->ms[row] = row_sq / (double) ne0;
                } else if (rel && s->ms[row] > 0.0) {
                    const double inv = 1.0 / s->ms[row];
                    for (int64_t j = 0; j < ne0; ++j) {
                        rsq[j] += (double) r[j] * (double) r[j] * inv;
                    }
                }
            }
        }
    }
    e.rows += n_rows;
    if (rel) {
        e.rel_rows += n_rows;
    }
}

// Accumulate a MUL_MAT_ID's input into the expert tensor `name` of `n_expert` experts: x is
// [width, n_x, n_tokens] (n_x = 1 when every selected expert reads the token's one row, as gate and up do;
// n_used when each reads its own, as down does), ids is [n_used, n_tokens], the experts each token was
// routed to. Slot k of token t adds x[:, k % n_x, t] to expert ids[k, t]'s sums and one to its count.
void accumulate_experts(stats_collector * s, const std::string & name, const ggml_tensor * x,
                        const ggml_tensor * ids, int64_t n_expert) {
    if (x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float) || ids->type != GGML_TYPE_I32) {
        if (s->error.empty()) {
            s->error = "input of " + name + " is " + ggml_type_name(x->type) + " with " +
                       ggml_type_name(ids->type) + " expert ids, not contiguous F32 with I32 ids";
        }
        return;
    }
    const int64_t n_tokens = x->ne[2];
    if (x->ne[3] != 1 || ids->ne[1] != n_tokens) {
        if (s->error.empty()) {
            s->error = name + ": a MUL_MAT_ID input of 4 dimensions or with ids for another token count";
        }
        return;
    }
    const int64_t ne0 = x->ne[0];
    stats_entry * ep  = entry(s, name, ne0, n_expert);
    if (!ep) {
        return;
    }
    stats_entry & e    = *ep;
    const char *  data = host_data(x, s->host_copy);
    s->ids_copy.resize(ggml_nbytes(ids));  // the ids are small and may be a strided view: copy them whole
    ggml_backend_tensor_get(ids, s->ids_copy.data(), 0, s->ids_copy.size());
    const bool rel = (int64_t) s->ms.size() == n_tokens;
    for (int64_t t = 0; t < n_tokens; ++t) {
        const double inv = rel && s->ms[t] > 0.0 ? 1.0 / s->ms[t] : 0.0;
        for (int64_t k = 0; k < ids->ne[0]; ++k) {
            const int32_t ex = *reinterpret_cast<const int32_t *>(s->ids_copy.data() + t * ids->nb[1] + k * ids->nb[0]);
            if (ex < 0 || ex >= n_expert) {
                if (s->error.empty()) {
                    s->error = name + ": expert id " + std::to_string(ex) + " of " + std::to_string(n_expert);
                }
                return;
            }
            const auto * r   = reinterpret_cast<const float *>(data + (k % x->ne[1]) * x->nb[1] + t * x->nb[2]);
            float *      mx  = e.max_abs.data() + ex * ne0;
            double *     sq  = e.sum_sq.data() + ex * ne0;
            double *     rsq = e.rel_sq.data() + ex * ne0;
            for (int64_t j = 0; j < ne0; ++j) {
                const double v2 = (double) r[j] * (double) r[j];
                mx[j]           = std::max(mx[j], std::fabs(r[j]));
                sq[j] += v2;
                rsq[j] += v2 * inv;
            }
            e.counts[ex] += 1;
        }
    }
    e.rows += n_tokens;
    if (rel) {
        e.rel_rows += n_tokens;
    }
}

bool starts(const std::vector<std::string> & prefixes, const std::string & name) {
    return std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string & p) { return name.rfind(p, 0) == 0; });
}

}  // namespace

// The eval callback: pass its address as llama_context_params.cb_eval and the collector as
// cb_eval_user_data. With ask=true the scheduler asks whether we want a node's result (it then splits the
// graph after that node); with ask=false the node has been computed and its inputs are readable.
// A MUL_MAT on a weight records its input x under the weight's name; any other node whose graph name starts
// with a watched prefix (ramp_stats_watch, e.g. "l_out-": the residual stream after each block) records its
// own result under that name.
RAMP_API bool ramp_stats_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * s = static_cast<stats_collector *>(user_data);
    if (t->op == GGML_OP_MUL_MAT_ID && s->experts && t->src[0] && t->src[1] && t->src[2]) {
        const std::string name = weight_name(t->src[0]->name);
        if (!is_weight(name)) {
            return false;
        }
        if (!ask) {
            std::lock_guard<std::mutex> lock(s->mutex);
            accumulate_experts(s, name, t->src[1], t->src[2], t->src[0]->ne[2]);
        }
        return true;
    }
    if (t->op != GGML_OP_MUL_MAT || !t->src[0] || !t->src[1]) {
        if (s->watch.empty() || t->op == GGML_OP_NONE) {
            return false;
        }
        const std::string name = weight_name(t->name);
        if (!starts(s->watch, name)) {
            return false;
        }
        if (!ask) {
            std::lock_guard<std::mutex> lock(s->mutex);
            accumulate(s, name, t, starts(s->residual, name));
        }
        return true;
    }
    const std::string name = weight_name(t->src[0]->name);
    if (!is_weight(name)) {
        return false;
    }
    if (!ask) {
        std::lock_guard<std::mutex> lock(s->mutex);
        accumulate(s, name, t->src[1], false);
        if (name == "output.weight" || name == "token_embd.weight") {
            // the head ends the graph: the next batch's first weights have no residual row of theirs until a
            // residual node of that batch is met (a model whose embeddings node is not watched)
            s->ms.clear();
        }
    }
    return true;
}

// Watch the graph nodes whose name starts with `prefix` too (kept across resets); `residual` != 0: they are
// the residual stream, whose rows' mean squares divide the weights' inputs that follow (rel_sq).
RAMP_API void ramp_stats_watch(void * c, const char * prefix, int32_t residual) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    s->watch.emplace_back(prefix);
    if (residual) {
        s->residual.emplace_back(prefix);
    }
}

RAMP_API int32_t ramp_stats_count(void * c) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    return (int32_t) s->entries.size();
}

// Name, width and rows of entry i; the name pointer stays valid until the next reset or free.
RAMP_API const char * ramp_stats_entry(void * c, int32_t i, int64_t * width, int64_t * rows) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    if (i < 0 || (size_t) i >= s->entries.size()) {
        return nullptr;
    }
    const stats_entry & e = s->entries[i];
    *width                = e.width;
    *rows                 = e.rows;
    return e.name.c_str();
}

// Handle MUL_MAT_ID too (expert tensors; kept across resets): code that sizes every entry as one row of
// `width` never calls it, so it never meets an entry of n_expert rows.
RAMP_API void ramp_stats_experts(void * c, int32_t on) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    s->experts = on != 0;
}

// Entry i's experts (0 for a 2-D weight); with counts non-null, copy the rows routed to each expert
// (int64[n_expert]) there. Returns -1 for a bad index.
RAMP_API int64_t ramp_stats_expert_counts(void * c, int32_t i, int64_t * counts) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    if (i < 0 || (size_t) i >= s->entries.size()) {
        return -1;
    }
    const stats_entry & e = s->entries[i];
    if (counts) {
        std::copy(e.counts.begin(), e.counts.end(), counts);
    }
    return e.n_expert;
}

// Copy entry i's max_abs (float[width]) and sum_sq (double[width]); an expert tensor's are n_expert x width,
// expert-major. Returns 0, or 1 for a bad index.
RAMP_API int32_t ramp_stats_copy(void * c, int32_t i, float * max_abs, double * sum_sq) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    if (i < 0 || (size_t) i >= s->entries.size()) {
        return 1;
    }
    const stats_entry & e = s->entries[i];
    std::copy(e.max_abs.begin(), e.max_abs.end(), max_abs);
    std::copy(e.sum_sq.begin(), e.sum_sq.end(), sum_sq);
    return 0;
}

// Copy entry i's rel_sq (double[width], n_expert x width for an expert tensor) and the rows it holds; returns
// 0, or 1 for a bad index.
RAMP_API int32_t ramp_stats_copy_rel(void * c, int32_t i, double * rel_sq, int64_t * rel_rows) {
    auto * s = static_cast<stats_collector *>(c);
    std::lock_guard<std::mutex> lock(s->mutex);
    if (i < 0 || (size_t) i >= s->entries.size()) {
        return 1;
    }
    const stats_entry & e = s->entries[i];
    std::copy(e.rel_sq.begin(), e.rel_sq.end(), rel_sq);
    *rel_rows = e.rel_rows;
    return 0;
}

// The first problem the callback met since the last reset ("" if none).
RAMP_API const char * ramp_stats_error(void * c) {
    return static_cast<stats_collector *>(c)->error.c_str();
}

// The ABI: a changed export bumps the version (every older caller refuses the library); an added one bumps
// the minor only, so code that predates it (tests/test_run_dir_compat.py runs such code) still loads it.
RAMP_API int32_t ramp_abi_version(void) {
    return 2;
}

// 1: graph-node watching and the residual-relative sums (ramp_stats_watch, ramp_stats_copy_rel).
// 2: expert tensors through MUL_MAT_ID (ramp_stats_experts, ramp_stats_expert_counts).
RAMP_API int32_t ramp_abi_minor(void) {
    return 2;
}
