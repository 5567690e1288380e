// ramp-cpp native helper: a thin C ABI over the libllama.so that llama-cpp-python ships, loaded from
// Python with ctypes so quantization and evaluation run through one and the same llama.cpp build.
//
// Why C++ at all: llama_model_quantize needs NUL-terminated arrays of C structs kept alive for the whole
// call, its errors only reach the log callback, and row-level quantization (ggml_quantize_chunk) is
// the primitive the tensor cache of the search is built from.

#include "ggml.h"
#include "llama.h"

#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
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

RAMP_API int32_t ramp_abi_version(void) {
    return 1;
}
