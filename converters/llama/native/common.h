// What ggufbot's programs share: dying with a message, a read-only mapping of a file, a ggml type by its name.
// Define GGUFBOT_PROGRAM (the program's name, for its messages) before including this file.

#pragma once

#include "ggml.h"

#include <fcntl.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

static void die(const std::string & msg) {
    fprintf(stderr, "%s: %s\n", GGUFBOT_PROGRAM, msg.c_str());
    exit(1);
}

struct Mapped {
    const uint8_t * data = nullptr;
    size_t size = 0;
};

static Mapped map_file(const char * path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(std::string("cannot open ") + path);
    struct stat st;
    if (fstat(fd, &st) != 0) die(std::string("cannot stat ") + path);
    Mapped m;
    m.size = (size_t) st.st_size;
    if (m.size > 0) {
        void * p = mmap(nullptr, m.size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) die(std::string("cannot map ") + path);
        m.data = (const uint8_t *) p;
    }
    close(fd);
    return m;
}

static ggml_type type_by_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && strcasecmp(n, name.c_str()) == 0 && ggml_get_type_traits((ggml_type) t)->blck_size > 0) {
            return (ggml_type) t;
        }
    }
    die("unknown ggml type " + name);
    return GGML_TYPE_COUNT;
}
