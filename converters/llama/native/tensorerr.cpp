// ggufbot-tensorerr: the importance-weighted quantization error of tensors of a GGUF file, per ggml type, on
// chosen rows, with the pinned llama.cpp's own quantizer (ggml_quantize_chunk, as llama-quantize calls it: row by
// row, with the imatrix entry of the row's matrix) and dequantizer (the type's to_float).
//
//   ggufbot-tensorerr MODEL.gguf REQUEST WEIGHTS ROWS THREADS [BYTES]
//
// REQUEST: one line per tensor, fields separated by single spaces:
//   NAME TYPES IMATRIX_OFFSET ROW_WEIGHTS_OFFSET ROWS_OFFSET N_ROWS
// TYPES: ggml type names joined by commas; IMATRIX_OFFSET: index of the tensor's imatrix (columns x matrices
// floats) in WEIGHTS, -1 for none; ROW_WEIGHTS_OFFSET: index of one weight per row of the whole tensor in WEIGHTS,
// -1 for none (every row weighs 1); ROWS_OFFSET, N_ROWS: the rows to measure, N_ROWS int64 row indices in ROWS
// (ROWS_OFFSET -1: every row). WEIGHTS holds little-endian float32, ROWS little-endian int64.
//
// Prints one line per (tensor, type): NAME TYPE ERROR, ERROR the sum over the chosen rows r and columns c of
// row_weight[r] * imatrix[matrix(r)][c] * (w - dequantize(quantize(w)))^2, or NA when llama.cpp would not write that
// type for this tensor (its row length is not a multiple of the type's block, or the type needs an imatrix and none
// was given). Exits 1 with a message on stderr on bad input.
//
// With BYTES (a file path), the quantized bytes of the chosen rows of every measured pair are appended to it, row
// after row in the order of the request's rows, and the line gets a fourth field: the offset of the pair's first
// row in BYTES (ggufbot-assemble copies these rows instead of quantizing them again). A type written with a trailing
// '-' (Q4_0-) is measured but its bytes are not kept (a file the build copies from holds the whole tensor already).

#define GGUFBOT_PROGRAM "ggufbot-tensorerr"
#include "common.h"
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 6 && argc != 7) die("usage: ggufbot-tensorerr MODEL.gguf REQUEST WEIGHTS ROWS THREADS [BYTES]");
    const int n_threads = std::max(1, atoi(argv[5]));
    FILE * bytes_out = nullptr;
    long long bytes_at = 0;
    if (argc == 7) {
        bytes_out = fopen(argv[6], "wb");
        if (!bytes_out) die(std::string("cannot write ") + argv[6]);
    }

    struct gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    struct ggml_context * meta = nullptr;
    params.ctx = &meta;
    struct gguf_context * g = gguf_init_from_file(argv[1], params);
    if (!g) die(std::string("cannot read GGUF ") + argv[1]);
    Mapped model = map_file(argv[1]);
    Mapped wfile = map_file(argv[3]);
    Mapped rfile = map_file(argv[4]);
    const float * weights = (const float *) wfile.data;
    const int64_t n_weights = (int64_t) (wfile.size / sizeof(float));
    const int64_t * rows_all = (const int64_t *) rfile.data;
    const int64_t n_rows_all = (int64_t) (rfile.size / sizeof(int64_t));
    const size_t data_offset = gguf_get_data_offset(g);

    std::ifstream req(argv[2]);
    if (!req) die(std::string("cannot read ") + argv[2]);
    std::string line;
    while (std::getline(req, line)) {
        if (line.empty()) continue;
        std::istringstream in(line);
        std::string name, types;
        long long imat_off, roww_off, rows_off, n_sel;
        if (!(in >> name >> types >> imat_off >> roww_off >> rows_off >> n_sel)) die("bad request line: " + line);
        const int64_t tid = gguf_find_tensor(g, name.c_str());
        if (tid < 0) die("no tensor " + name);
        const ggml_tensor * t = ggml_get_tensor(meta, name.c_str());
        if (!t) die("no tensor " + name);
        const int64_t n_per_row = t->ne[0];
        const int64_t n_rows = ggml_nrows(t);
        const int64_t rows_per_matrix = t->ne[1];
        const int64_t n_matrices = n_rows / rows_per_matrix;
        const ggml_type src_type = t->type;
        const auto * src_traits = ggml_get_type_traits(src_type);
        if (!src_traits->to_float && src_type != GGML_TYPE_F32) die("cannot read " + name + " of type " + ggml_type_name(src_type));
        const size_t src_row = ggml_row_size(src_type, n_per_row);
        const uint8_t * src = model.data + data_offset + gguf_get_tensor_offset(g, tid);
        if (src + src_row * n_rows > model.data + model.size) die(name + " lies past the end of the file");
        const float * imat = nullptr;
        if (imat_off >= 0) {
            if (imat_off + n_per_row * n_matrices > n_weights) die("imatrix of " + name + " past the end of WEIGHTS");
            imat = weights + imat_off;
        }
        const float * roww = nullptr;
        if (roww_off >= 0) {
            if (roww_off + n_rows > n_weights) die("row weights of " + name + " past the end of WEIGHTS");
            roww = weights + roww_off;
        }
        std::vector<int64_t> sel;
        if (rows_off >= 0) {
            if (rows_off + n_sel > n_rows_all) die("rows of " + name + " past the end of ROWS");
            sel.assign(rows_all + rows_off, rows_all + rows_off + n_sel);
            for (int64_t r : sel) if (r < 0 || r >= n_rows) die("row out of range in " + name);
        } else {
            sel.resize(n_rows);
            for (int64_t r = 0; r < n_rows; ++r) sel[r] = r;
        }
        // the chosen rows as float32, once per tensor
        std::vector<float> ref(sel.size() * n_per_row);
        for (size_t i = 0; i < sel.size(); ++i) {
            const uint8_t * row = src + src_row * sel[i];
            if (src_type == GGML_TYPE_F32) {
                memcpy(&ref[i * n_per_row], row, n_per_row * sizeof(float));
            } else {
                src_traits->to_float(row, &ref[i * n_per_row], n_per_row);
            }
        }
        std::string ty;
        std::istringstream ts(types);
        while (std::getline(ts, ty, ',')) {
            const bool keep = bytes_out != nullptr && !(ty.size() > 1 && ty.back() == '-');
            if (!ty.empty() && ty.back() == '-') ty.pop_back();
            const ggml_type q = type_by_name(ty);
            const auto * qt = ggml_get_type_traits(q);
            if (n_per_row % qt->blck_size != 0 || (imat == nullptr && ggml_quantize_requires_imatrix(q)) || !qt->to_float) {
                printf("%s %s NA\n", name.c_str(), ty.c_str());
                continue;
            }
            ggml_quantize_init(q);  // its tables, before the threads share them
            const size_t q_row = ggml_row_size(q, n_per_row);
            std::atomic<int64_t> next(0);
            std::vector<double> per_row(sel.size(), 0.0);  // summed in row order after: the same figure every run
            std::vector<uint8_t> kept(keep ? q_row * sel.size() : 0);
            auto work = [&]() {
                std::vector<uint8_t> own(q_row);
                std::vector<float> back(n_per_row);
                for (int64_t i; (i = next.fetch_add(1)) < (int64_t) sel.size();) {
                    const int64_t r = sel[i];
                    const float * x = &ref[i * n_per_row];
                    const float * im = imat ? imat + (r / rows_per_matrix) * n_per_row : nullptr;
                    uint8_t * qbuf = keep ? &kept[i * q_row] : own.data();
                    ggml_quantize_chunk(q, x, qbuf, 0, 1, n_per_row, im);
                    qt->to_float(qbuf, back.data(), n_per_row);
                    double s = 0.0;
                    for (int64_t c = 0; c < n_per_row; ++c) {
                        const double d = (double) x[c] - (double) back[c];
                        s += (im ? (double) im[c] : 1.0) * d * d;
                    }
                    per_row[i] = (roww ? (double) roww[r] : 1.0) * s;
                }
            };
            std::vector<std::thread> pool;
            for (int k = 1; k < n_threads; ++k) pool.emplace_back(work);
            work();
            for (auto & th : pool) th.join();
            double total = 0.0;
            for (double v : per_row) total += v;
            if (keep) {
                if (fwrite(kept.data(), 1, kept.size(), bytes_out) != kept.size()) die("cannot write the bytes");
                printf("%s %s %.17g %lld\n", name.c_str(), ty.c_str(), total, bytes_at);
                bytes_at += (long long) kept.size();
            } else {
                printf("%s %s %.17g\n", name.c_str(), ty.c_str(), total);
            }
        }
        fflush(stdout);
    }
    if (bytes_out && fclose(bytes_out) != 0) die(std::string("cannot close ") + argv[6]);
    gguf_free(g);
    ggml_free(meta);
    return 0;
}
