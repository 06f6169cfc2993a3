// ggufbot-assemble: write a GGUF file whose tensors take planned types, byte for byte what llama-quantize writes for
// the same plan (--tensor-type-file, same file type and imatrix), without quantizing again what another file already
// holds: a tensor's quantized bytes depend only on its data, its type and its imatrix entry (llama-quantize quantizes
// row by row with ggml_quantize_chunk), so a tensor some file of the same reference and imatrix holds in the planned
// type is copied from it, and only the rest is quantized here, with the same ggml function.
//
//   ggufbot-assemble REFERENCE.gguf TEMPLATE.gguf PLAN WEIGHTS OUT.gguf THREADS BYTES ROWS [FILE...]
//
// TEMPLATE: a file llama-quantize wrote from REFERENCE with the same file type and imatrix: its metadata (key/value
// pairs, in order) and its tensor order are the output's. PLAN: one line per tensor of TEMPLATE, fields separated by
// single spaces:
//   NAME TYPE SOURCE IMATRIX_OFFSET [BYTES_OFFSET ROWS_OFFSET N_ROWS]
// TYPE: the ggml type name to write; SOURCE: -1 to quantize the tensor of REFERENCE (with the imatrix of each of its
// matrices at IMATRIX_OFFSET in WEIGHTS, -1 for none; WEIGHTS holds little-endian float32), or k >= 0 to copy the
// tensor's bytes from FILE k, which must hold it in TYPE. With BYTES_OFFSET >= 0, some rows of a quantized tensor
// are already quantized (by ggufbot-tensorerr, with the same function, imatrix row and input): N_ROWS rows, their
// indices the int64 at ROWS_OFFSET in ROWS (-1: rows 0 to N_ROWS-1), their bytes row after row from BYTES_OFFSET in
// BYTES; they are copied, the other rows quantized. BYTES and ROWS are "-" when no line uses them. Exits 1 with a
// message on stderr on bad input; prints one line "NAME TYPE copied|quantized ROWS_QUANTIZED" per tensor.

#define GGUFBOT_PROGRAM "ggufbot-assemble"
#include "common.h"
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

struct Gguf {
    std::string path;
    gguf_context * g = nullptr;
    ggml_context * meta = nullptr;
    Mapped map;

    explicit Gguf(const char * p) : path(p) {
        struct gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ &meta};
        g = gguf_init_from_file(p, params);
        if (!g) die(std::string("cannot read GGUF ") + p);
        map = map_file(p);
    }

    // the tensor's type and bytes in this file
    const uint8_t * bytes(const std::string & name, ggml_type * type, size_t * size) const {
        const int64_t id = gguf_find_tensor(g, name.c_str());
        if (id < 0) die("no tensor " + name + " in " + path);
        *type = gguf_get_tensor_type(g, id);
        *size = gguf_get_tensor_size(g, id);
        const size_t off = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id);
        if (off + *size > map.size) die(name + " lies past the end of " + path);
        return map.data + off;
    }
};

struct Step {
    ggml_type type;
    long long source;
    long long imat_off;
    long long bytes_off = -1;
    long long rows_off = -1;
    long long n_rows = 0;
};

// rows of a tensor quantized earlier: row index -> its bytes
struct Done {
    std::vector<const uint8_t *> row;  // nullptr: quantize it
};

// the reference tensor quantized to `type`, as llama-quantize does it: each matrix (an expert of a 3-D tensor) with
// its own imatrix rows, rows converted to float32 and quantized independently (so the threads' split of the rows does
// not change a byte)
static std::vector<uint8_t> quantize(const Gguf & ref, const ggml_tensor * t, ggml_type type, const float * imat,
                                     const Done & done, int n_threads, int64_t * n_quantized) {
    ggml_type src_type;
    size_t src_size;
    const uint8_t * src = ref.bytes(t->name, &src_type, &src_size);
    const auto * src_traits = ggml_get_type_traits(src_type);
    if (!src_traits->to_float && src_type != GGML_TYPE_F32) die(std::string("cannot read ") + t->name);
    const int64_t n_per_row = t->ne[0];
    const int64_t n_rows = ggml_nrows(t);
    const int64_t rows_per_matrix = t->ne[1];
    const auto * qt = ggml_get_type_traits(type);
    if (n_per_row % qt->blck_size != 0) die(std::string(t->name) + ": rows of " + std::to_string(n_per_row) +
                                            " are not whole blocks of " + ggml_type_name(type));
    if (imat == nullptr && ggml_quantize_requires_imatrix(type)) die(std::string(t->name) + ": " +
                                                                     ggml_type_name(type) + " needs an imatrix");
    ggml_quantize_init(type);
    if (src_size != ggml_row_size(src_type, n_per_row) * n_rows) die(std::string(t->name) + ": size mismatch");
    const size_t src_row = ggml_row_size(src_type, n_per_row);
    const size_t q_row = ggml_row_size(type, n_per_row);
    std::vector<uint8_t> out(q_row * n_rows);
    // tasks of up to 32 rows, never across a matrix (its imatrix rows change there)
    std::vector<std::pair<int64_t, int64_t>> tasks;
    for (int64_t m0 = 0; m0 < n_rows; m0 += rows_per_matrix) {
        for (int64_t r0 = m0; r0 < m0 + rows_per_matrix; r0 += 32) {
            tasks.emplace_back(r0, std::min(r0 + 32, m0 + rows_per_matrix));
        }
    }
    std::atomic<size_t> next(0);
    std::atomic<int64_t> quantized(0);
    auto work = [&]() {
        std::vector<float> f(32 * n_per_row);
        for (size_t i; (i = next.fetch_add(1)) < tasks.size();) {
            const int64_t r0 = tasks[i].first, r1 = tasks[i].second;
            const float * im = imat ? imat + (r0 / rows_per_matrix) * n_per_row : nullptr;
            // runs of rows not quantized before, each quantized in one call; the others copied
            for (int64_t a = r0; a < r1;) {
                if (!done.row.empty() && done.row[a]) {
                    memcpy(out.data() + q_row * a, done.row[a], q_row);
                    ++a;
                    continue;
                }
                int64_t b = a;
                while (b < r1 && (done.row.empty() || !done.row[b])) ++b;
                for (int64_t r = a; r < b; ++r) {
                    const uint8_t * row = src + src_row * r;
                    float * dst = &f[(r - a) * n_per_row];
                    if (src_type == GGML_TYPE_F32) {
                        memcpy(dst, row, n_per_row * sizeof(float));
                    } else {
                        src_traits->to_float(row, dst, n_per_row);
                    }
                }
                ggml_quantize_chunk(type, f.data(), out.data() + q_row * a, 0, b - a, n_per_row, im);
                quantized += b - a;
                a = b;
            }
        }
    };
    std::vector<std::thread> pool;
    for (int k = 1; k < n_threads; ++k) pool.emplace_back(work);
    work();
    for (auto & th : pool) th.join();
    *n_quantized = quantized;
    return out;
}

int main(int argc, char ** argv) {
    if (argc < 9) die("usage: ggufbot-assemble REFERENCE.gguf TEMPLATE.gguf PLAN WEIGHTS OUT.gguf THREADS BYTES ROWS "
                      "[FILE...]");
    const int n_threads = std::max(1, atoi(argv[6]));
    Gguf ref(argv[1]);
    Gguf tpl(argv[2]);
    std::vector<Gguf *> files;
    for (int i = 9; i < argc; ++i) files.push_back(new Gguf(argv[i]));
    Mapped wfile = map_file(argv[4]);
    const float * weights = (const float *) wfile.data;
    const int64_t n_weights = (int64_t) (wfile.size / sizeof(float));
    Mapped bfile, rfile;
    if (strcmp(argv[7], "-") != 0) bfile = map_file(argv[7]);
    if (strcmp(argv[8], "-") != 0) rfile = map_file(argv[8]);
    const int64_t * rows_all = (const int64_t *) rfile.data;
    const int64_t n_rows_all = (int64_t) (rfile.size / sizeof(int64_t));

    std::map<std::string, Step> plan;
    std::ifstream req(argv[3]);
    if (!req) die(std::string("cannot read ") + argv[3]);
    std::string line;
    while (std::getline(req, line)) {
        if (line.empty()) continue;
        std::istringstream in(line);
        std::string name, type;
        long long source, imat_off;
        if (!(in >> name >> type >> source >> imat_off)) die("bad plan line: " + line);
        if (source >= (long long) files.size()) die("no FILE " + std::to_string(source) + " for " + name);
        Step step{type_by_name(type), source, imat_off};
        if (!(in >> step.bytes_off >> step.rows_off >> step.n_rows)) step.bytes_off = -1;
        plan[name] = step;
    }

    // the output's metadata: the template's key/value pairs and tensors, each tensor then set to its planned type
    gguf_context * out = gguf_init_empty();
    gguf_set_kv(out, tpl.g);
    const int64_t n_tensors = gguf_get_n_tensors(tpl.g);
    if ((int64_t) plan.size() != n_tensors) die("the plan names " + std::to_string(plan.size()) + " tensors, the "
                                                "template holds " + std::to_string(n_tensors));
    std::vector<const ggml_tensor *> order;
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char * name = gguf_get_tensor_name(tpl.g, i);
        const ggml_tensor * t = ggml_get_tensor(tpl.meta, name);
        if (!t) die(std::string("no tensor ") + name + " in the template");
        if (!plan.count(name)) die(std::string("the plan does not name ") + name);
        gguf_add_tensor(out, t);
        gguf_set_tensor_type(out, name, plan[name].type);
        order.push_back(t);
    }
    const size_t align = gguf_get_alignment(out);
    std::vector<uint8_t> meta(gguf_get_meta_size(out));
    gguf_get_meta_data(out, meta.data());

    FILE * f = fopen(argv[5], "wb");
    if (!f) die(std::string("cannot write ") + argv[5]);
    if (fwrite(meta.data(), 1, meta.size(), f) != meta.size()) die("write failed");
    static const uint8_t zeros[64] = {0};
    for (const ggml_tensor * t : order) {
        const Step & s = plan[t->name];
        const size_t want = gguf_get_tensor_size(out, gguf_find_tensor(out, t->name));
        std::vector<uint8_t> buf;
        const uint8_t * data;
        size_t size;
        int64_t n_quantized = 0;
        if (s.source >= 0) {
            ggml_type held;
            data = files[s.source]->bytes(t->name, &held, &size);
            if (held != s.type) die(std::string(t->name) + " is " + ggml_type_name(held) + " in " +
                                    files[s.source]->path + ", not " + ggml_type_name(s.type));
        } else {
            const ggml_tensor * rt = ggml_get_tensor(ref.meta, t->name);
            if (!rt) die(std::string("no tensor ") + t->name + " in the reference");
            const int64_t n_matrices = ggml_nrows(rt) / rt->ne[1];
            const float * imat = nullptr;
            if (s.imat_off >= 0) {
                if (s.imat_off + rt->ne[0] * n_matrices > n_weights) die(std::string("imatrix of ") + t->name +
                                                                         " past the end of WEIGHTS");
                imat = weights + s.imat_off;
            }
            Done done;
            if (s.bytes_off >= 0) {
                const int64_t n_rows = ggml_nrows(rt);
                const size_t q_row = ggml_row_size(s.type, rt->ne[0]);
                if (s.bytes_off + (long long) q_row * s.n_rows > (long long) bfile.size) die(std::string("rows of ") +
                                                                                     t->name + " past the end of BYTES");
                if (s.rows_off >= 0 && s.rows_off + s.n_rows > n_rows_all) die(std::string("rows of ") + t->name +
                                                                               " past the end of ROWS");
                done.row.assign(n_rows, nullptr);
                for (long long i = 0; i < s.n_rows; ++i) {
                    const int64_t r = s.rows_off >= 0 ? rows_all[s.rows_off + i] : i;
                    if (r < 0 || r >= n_rows) die(std::string("row out of range in ") + t->name);
                    done.row[r] = bfile.data + s.bytes_off + q_row * i;
                }
            }
            buf = quantize(ref, rt, s.type, imat, done, n_threads, &n_quantized);
            data = buf.data();
            size = buf.size();
        }
        if (size != want) die(std::string(t->name) + ": " + std::to_string(size) + " bytes, the metadata says " +
                              std::to_string(want));
        if (fwrite(data, 1, size, f) != size) die("write failed");
        const size_t pad = GGML_PAD(size, align) - size;
        for (size_t left = pad; left > 0;) {
            const size_t n = std::min(left, sizeof(zeros));
            if (fwrite(zeros, 1, n, f) != n) die("write failed");
            left -= n;
        }
        printf("%s %s %s %lld\n", t->name, ggml_type_name(s.type), s.source >= 0 ? "copied" : "quantized",
               (long long) n_quantized);
    }
    if (fclose(f) != 0) die(std::string("cannot close ") + argv[5]);
    gguf_free(out);
    return 0;
}
