// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * filetest - files whose every 4 KiB block can be verified, for the
 * cleancache end-to-end tests. One source, built twice: for the host (to
 * create the file set that mkfs.ext4 -d packs into an image) and
 * statically for the guest (to read, change and verify it).
 *
 * Usage:
 *   filetest make DIR SPEC              create the files of SPEC in DIR
 *   filetest init MANIFEST SPEC         write the manifest of SPEC's files
 *   filetest verify MANIFEST DIR [SET]  read every file (of SET, a prefix),
 *                                       check every byte
 *   filetest mutate MANIFEST DIR SET ROUND [direct]
 *                                       change the files of SET, update the
 *                                       manifest
 *   filetest read MANIFEST DIR seq|rand [COUNT]
 *                                       fio-style 4 KiB reads, each block
 *                                       checked: every block of every file
 *                                       in order (seq), or COUNT blocks
 *                                       (default: as many as the set has)
 *                                       at random offsets of random files
 *                                       (rand, a fixed seed)
 *
 * SPEC is SET:COUNT:KIB:ID0[,SET:COUNT:KIB:ID0...]: COUNT files named
 * SET0000, SET0001, ... of KIB KiB each, with file ids ID0, ID0+1, ...
 *
 * Content: block B of a file with id I in generation G is a 32-byte header
 * (magic, I, B, G) followed by a pseudo-random body derived from (I, B, G),
 * so every block of every file and generation differs (no zero pages, no
 * duplicates, incompressible), and a block read back in an old form shows
 * which generation it came from. Generation 0 means zeros (holes, and the
 * range between a truncation and a later extension). A block may hold
 * only its first LEN bytes of pattern, then zeros (a truncation inside the
 * block).
 *
 * The manifest is text: "file NAME ID SIZE NRUNS", then NRUNS lines
 * "run FIRST COUNT GEN LEN" covering the file's blocks in order.
 *
 * mutate (on the files of SET, chosen by index modulo 8):
 *   0 rewrite the whole file with a new generation (buffered)
 *   1 rewrite every third block (buffered)
 *   2 truncate to a size inside a block (about half the file)
 *   3 truncate to a third, then extend back to the old size (zeros between)
 *   4 punch holes (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE) over every fourth pair
 *     of blocks
 *   5 delete, then create a file of the same name, a new id and size
 *     (the inode number is likely reused)
 *   6 write every other block with O_DIRECT ("direct" given; else buffered)
 *   7 leave alone (control)
 * then creates new files SET-new-ROUND-N, and syncs.
 *
 * verify prints "filetest: verify SET: files F blocks B bytes N bad_bytes E
 * bad_blocks K" and, for the first few bad blocks, what was found (the
 * header of a stale block names its generation). Exit status 0 only if
 * everything matched, including the set of file names in DIR.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define BLK 4096
#define MAGIC 0x76746d2d66696c65ULL /* "vtm-file" */
#define CHUNK (64 * BLK)

struct run {
	uint64_t first, count;
	uint32_t gen, len;
};

struct file {
	char name[64];
	uint64_t id, size;
	size_t nruns, cap;
	struct run *runs;
	int deleted;
};

static struct file *files;
static size_t nfiles, capfiles;

static void die(const char *what)
{
	fprintf(stderr, "filetest: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p)
		die("realloc");
	return p;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* The expected content of one block: pattern for len bytes, then zeros. */
static void block(unsigned char *p, uint64_t id, uint64_t blk, uint32_t gen, uint32_t len)
{
	uint64_t *w = (uint64_t *)p;
	uint64_t s;

	if (gen == 0 || len == 0) {
		memset(p, 0, BLK);
		return;
	}
	w[0] = MAGIC;
	w[1] = id;
	w[2] = blk;
	w[3] = gen;
	s = mix(mix(id * 0x100000001b3ULL + blk) ^ ((uint64_t)gen << 40) ^ 0x5851f42d4c957f2dULL) | 1;
	for (size_t i = 4; i < BLK / 8; i++) {
		/* xorshift64*: cheap enough under TCG */
		s ^= s >> 12;
		s ^= s << 25;
		s ^= s >> 27;
		w[i] = s * 0x2545f4914f6cdd1dULL;
	}
	if (len < BLK)
		memset(p + len, 0, BLK - len);
}

/* --- the model ---------------------------------------------------------- */

static struct file *add_file(const char *name, uint64_t id)
{
	struct file *f;

	if (nfiles == capfiles) {
		capfiles = capfiles ? capfiles * 2 : 64;
		files = xrealloc(files, capfiles * sizeof(*files));
	}
	f = &files[nfiles++];
	memset(f, 0, sizeof(*f));
	snprintf(f->name, sizeof(f->name), "%s", name);
	f->id = id;
	return f;
}

static void push_run(struct file *f, uint64_t first, uint64_t count, uint32_t gen, uint32_t len)
{
	if (count == 0)
		return;
	if (gen == 0)
		len = 0;
	if (f->nruns) {
		struct run *r = &f->runs[f->nruns - 1];

		if (r->gen == gen && r->len == len && len == BLK && r->first + r->count == first) {
			r->count += count;
			return;
		}
		if (r->gen == 0 && gen == 0 && r->first + r->count == first) {
			r->count += count;
			return;
		}
	}
	if (f->nruns == f->cap) {
		f->cap = f->cap ? f->cap * 2 : 8;
		f->runs = xrealloc(f->runs, f->cap * sizeof(*f->runs));
	}
	f->runs[f->nruns++] = (struct run){ first, count, gen, len };
}

static uint64_t nblocks(uint64_t size)
{
	return (size + BLK - 1) / BLK;
}

/* Expanded per-block view of a file, to edit and re-compress. */
struct blocks {
	uint64_t n;
	uint32_t *gen, *len;
};

static struct blocks expand(const struct file *f)
{
	struct blocks b = { nblocks(f->size), NULL, NULL };

	b.gen = calloc(b.n + 1, sizeof(uint32_t));
	b.len = calloc(b.n + 1, sizeof(uint32_t));
	if (!b.gen || !b.len)
		die("calloc");
	for (size_t i = 0; i < f->nruns; i++)
		for (uint64_t k = 0; k < f->runs[i].count && f->runs[i].first + k < b.n; k++) {
			b.gen[f->runs[i].first + k] = f->runs[i].gen;
			b.len[f->runs[i].first + k] = f->runs[i].len;
		}
	return b;
}

static void compress(struct file *f, struct blocks *b)
{
	f->nruns = 0;
	for (uint64_t i = 0; i < b->n; i++)
		push_run(f, i, 1, b->gen[i], b->len[i]);
	free(b->gen);
	free(b->len);
}

static void add_spec(const char *spec)
{
	char *copy = strdup(spec), *save = NULL, *tok;

	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char set[32];
		unsigned long count, kib;
		unsigned long long id0;

		if (sscanf(tok, "%31[^:]:%lu:%lu:%llu", set, &count, &kib, &id0) != 4) {
			fprintf(stderr, "filetest: bad spec item '%s'\n", tok);
			exit(2);
		}
		for (unsigned long i = 0; i < count; i++) {
			char name[64];
			struct file *f;

			snprintf(name, sizeof(name), "%s%04lu", set, i);
			f = add_file(name, id0 + i);
			f->size = (uint64_t)kib * 1024;
			push_run(f, 0, nblocks(f->size), 1, BLK);
		}
	}
	free(copy);
}

static void load(const char *path)
{
	FILE *m = fopen(path, "r");
	char line[256];
	struct file *f = NULL;

	if (!m)
		die(path);
	while (fgets(line, sizeof(line), m)) {
		char name[64];
		unsigned long long a, b, c, d;
		unsigned long long id, size, nr;

		if (sscanf(line, "file %63s %llu %llu %llu", name, &id, &size, &nr) == 4) {
			f = add_file(name, id);
			f->size = size;
		} else if (f && sscanf(line, "run %llu %llu %llu %llu", &a, &b, &c, &d) == 4) {
			push_run(f, a, b, (uint32_t)c, (uint32_t)d);
		}
	}
	fclose(m);
}

static void save(const char *path)
{
	char tmp[512];
	FILE *m;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	m = fopen(tmp, "w");
	if (!m)
		die(tmp);
	fprintf(m, "vtmem-filetest 1\n");
	for (size_t i = 0; i < nfiles; i++) {
		struct file *f = &files[i];

		if (f->deleted)
			continue;
		fprintf(m, "file %s %" PRIu64 " %" PRIu64 " %zu\n", f->name, f->id, f->size, f->nruns);
		for (size_t k = 0; k < f->nruns; k++)
			fprintf(m, "run %" PRIu64 " %" PRIu64 " %u %u\n", f->runs[k].first,
				f->runs[k].count, f->runs[k].gen, f->runs[k].len);
	}
	if (fclose(m) != 0 || rename(tmp, path) != 0)
		die(path);
}

static int in_set(const char *name, const char *set)
{
	return !set || strncmp(name, set, strlen(set)) == 0;
}

/* --- make --------------------------------------------------------------- */

static void write_file(const char *dir, struct file *f, int flags)
{
	char path[512];
	unsigned char *buf;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, f->name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | flags, 0644);
	if (fd < 0)
		die(path);
	if (posix_memalign((void **)&buf, BLK, CHUNK))
		die("posix_memalign");
	struct blocks b = expand(f);
	for (uint64_t i = 0; i < b.n;) {
		uint64_t n = 0;

		while (n < CHUNK / BLK && i + n < b.n) {
			block(buf + n * BLK, f->id, i + n, b.gen[i + n], b.len[i + n]);
			n++;
		}
		uint64_t bytes = n * BLK;
		if ((i + n) * BLK > f->size)
			bytes -= (i + n) * BLK - f->size;
		if (pwrite(fd, buf, bytes, i * BLK) != (ssize_t)bytes)
			die(path);
		i += n;
	}
	compress(f, &b);
	if (close(fd))
		die(path);
	free(buf);
}

/* --- verify ------------------------------------------------------------- */

static int name_known(const char *name)
{
	for (size_t i = 0; i < nfiles; i++)
		if (!files[i].deleted && strcmp(files[i].name, name) == 0)
			return 1;
	return 0;
}

static unsigned long long reported;

static void report_bad(const struct file *f, uint64_t blk, const unsigned char *got,
		       const unsigned char *want, uint32_t gen, uint32_t len)
{
	const uint64_t *w = (const uint64_t *)got;
	long first = -1;
	int zero = 1;

	for (long i = 0; i < BLK; i++) {
		if (got[i] != want[i] && first < 0)
			first = i;
		if (got[i])
			zero = 0;
	}
	if (reported++ >= 20)
		return;
	printf("filetest: BAD %s block %" PRIu64 " from byte %ld: want gen %u len %u; found ",
	       f->name, blk, first, gen, len);
	if (zero)
		printf("zeros\n");
	else if (w[0] == MAGIC)
		printf("id %" PRIu64 " block %" PRIu64 " gen %" PRIu64 "%s\n", w[1], w[2], w[3],
		       w[1] == f->id && w[2] == blk ? " (this block, other generation: stale?)" : "");
	else
		printf("no header (%016" PRIx64 ")\n", w[0]);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int verify(const char *dir, const char *set)
{
	unsigned char *buf, want[BLK];
	unsigned long long nf = 0, nb = 0, bytes = 0, bad_bytes = 0, bad_blocks = 0, bad_files = 0;
	double t = now();
	DIR *d;
	struct dirent *de;

	if (posix_memalign((void **)&buf, BLK, CHUNK))
		die("posix_memalign");
	for (size_t i = 0; i < nfiles; i++) {
		struct file *f = &files[i];
		char path[512];
		struct stat st;
		int fd;

		if (f->deleted || !in_set(f->name, set))
			continue;
		nf++;
		snprintf(path, sizeof(path), "%s/%s", dir, f->name);
		fd = open(path, O_RDONLY);
		if (fd < 0 || fstat(fd, &st) != 0) {
			printf("filetest: BAD %s: cannot open: %s\n", f->name, strerror(errno));
			bad_files++;
			if (fd >= 0)
				close(fd);
			continue;
		}
		if ((uint64_t)st.st_size != f->size) {
			printf("filetest: BAD %s: size %lld, want %" PRIu64 "\n", f->name,
			       (long long)st.st_size, f->size);
			bad_files++;
		}
		struct blocks b = expand(f);
		for (uint64_t i = 0; i < b.n;) {
			uint64_t want_bytes = CHUNK;
			ssize_t got;

			if (i * BLK + want_bytes > f->size)
				want_bytes = f->size - i * BLK;
			got = pread(fd, buf, want_bytes, i * BLK);
			if (got <= 0) {
				printf("filetest: BAD %s: read at block %" PRIu64 ": %s\n", f->name, i,
				       got < 0 ? strerror(errno) : "end of file");
				bad_files++;
				break;
			}
			uint64_t n = ((uint64_t)got + BLK - 1) / BLK;
			for (uint64_t k = 0; k < n; k++) {
				uint64_t valid = (uint64_t)got - k * BLK;

				if (valid > BLK)
					valid = BLK;
				block(want, f->id, i + k, b.gen[i + k], b.len[i + k]);
				if (memcmp(buf + k * BLK, want, valid) != 0) {
					unsigned long long e = 0;

					for (uint64_t x = 0; x < valid; x++)
						e += buf[k * BLK + x] != want[x];
					bad_bytes += e;
					bad_blocks++;
					report_bad(f, i + k, buf + k * BLK, want, b.gen[i + k], b.len[i + k]);
				}
				bytes += valid;
				nb++;
			}
			i += n;
		}
		compress(f, &b);
		close(fd);
	}
	/* No file of the set may exist beyond the manifest's (a deleted one back). */
	d = opendir(dir);
	if (!d)
		die(dir);
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.' || strcmp(de->d_name, "lost+found") == 0)
			continue;
		if (in_set(de->d_name, set) && !name_known(de->d_name)) {
			printf("filetest: BAD %s: exists but should not\n", de->d_name);
			bad_files++;
		}
	}
	closedir(d);
	printf("filetest: verify %s: files %llu blocks %llu bytes %llu bad_bytes %llu bad_blocks %llu "
	       "bad_files %llu in %.1f s\n", set ? set : "all", nf, nb, bytes, bad_bytes, bad_blocks,
	       bad_files, now() - t);
	fflush(stdout);
	free(buf);
	return bad_bytes || bad_blocks || bad_files || nf == 0;
}

/*
 * 4 KiB reads, one pread() a block, every block checked. Prints
 * "filetest: read MODE: blocks N bad_blocks K in T s".
 */
static int read_blocks(const char *dir, const char *mode, unsigned long long count)
{
	unsigned char *buf, want[BLK];
	unsigned long long total = 0, done = 0, bad = 0;
	int rnd = strcmp(mode, "rand") == 0;
	uint64_t seed = 0x9e3779b97f4a7c15ULL;
	double t = now();
	int *fds;

	if (!rnd && strcmp(mode, "seq") != 0)
		return 2;
	if (posix_memalign((void **)&buf, BLK, BLK))
		die("posix_memalign");
	fds = calloc(nfiles + 1, sizeof(int));
	if (!fds)
		die("calloc");
	for (size_t i = 0; i < nfiles; i++) {
		char path[512];

		fds[i] = -1;
		if (files[i].deleted)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, files[i].name);
		fds[i] = open(path, O_RDONLY);
		if (fds[i] < 0)
			die(path);
		total += nblocks(files[i].size);
	}
	if (!count)
		count = total;
	if (!rnd)
		count = total;
	for (size_t i = 0, blk = 0; done < count && total > 0;) {
		struct file *f;

		if (rnd) {
			seed = mix(seed + done);
			i = seed % nfiles;
			if (fds[i] < 0 || !nblocks(files[i].size))
				continue;
			blk = (seed >> 32) % nblocks(files[i].size);
		} else if (i >= nfiles) {
			break;
		} else if (fds[i] < 0 || blk >= nblocks(files[i].size)) {
			i++;
			blk = 0;
			continue;
		}
		f = &files[i];
		struct blocks b = expand(f);
		uint64_t valid = f->size - blk * BLK < BLK ? f->size - blk * BLK : BLK;
		ssize_t got = pread(fds[i], buf, BLK, blk * BLK);

		block(want, f->id, blk, b.gen[blk], b.len[blk]);
		if (got != (ssize_t)valid || memcmp(buf, want, valid) != 0) {
			bad++;
			report_bad(f, blk, buf, want, b.gen[blk], b.len[blk]);
		}
		compress(f, &b);
		done++;
		if (!rnd)
			blk++;
	}
	for (size_t i = 0; i < nfiles; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	printf("filetest: read %s: blocks %llu bad_blocks %llu in %.1f s\n", mode, done, bad,
	       now() - t);
	fflush(stdout);
	free(fds);
	free(buf);
	return bad != 0 || done == 0;
}

/* --- mutate ------------------------------------------------------------- */

static void write_blocks(const char *path, int fd, struct file *f, struct blocks *b,
			 uint64_t first, uint64_t count, uint32_t gen)
{
	unsigned char *buf;

	if (posix_memalign((void **)&buf, BLK, BLK))
		die("posix_memalign");
	for (uint64_t i = first; i < first + count && i < b->n; i++) {
		uint32_t len = BLK;

		if ((i + 1) * BLK > f->size)
			len = (uint32_t)(f->size - i * BLK);
		block(buf, f->id, i, gen, BLK);
		/* O_DIRECT wants whole blocks; the files written so are block-sized */
		if (pwrite(fd, buf, len, i * BLK) != (ssize_t)len)
			die(path);
		b->gen[i] = gen;
		b->len[i] = len;
	}
	free(buf);
}

static int mutate(const char *dir, const char *set, unsigned round, int direct)
{
	size_t n0 = nfiles;
	unsigned idx = 0, created = 0;
	uint32_t gen = 1 + round; /* round 1 writes generation 2, ... */
	uint64_t next_id = 1000000ULL * (round + 1);
	unsigned counts[8] = { 0 };

	for (size_t i = 0; i < n0; i++) {
		struct file *f = &files[i];
		char path[512];
		int fd, kind;

		if (f->deleted || !in_set(f->name, set))
			continue;
		kind = idx++ % 8;
		counts[kind]++;
		snprintf(path, sizeof(path), "%s/%s", dir, f->name);
		struct blocks b = expand(f);
		switch (kind) {
		case 0:
		case 1:
			fd = open(path, O_WRONLY);
			if (fd < 0)
				die(path);
			if (kind == 0)
				write_blocks(path, fd, f, &b, 0, b.n, gen);
			else
				for (uint64_t k = round % 3; k < b.n; k += 3)
					write_blocks(path, fd, f, &b, k, 1, gen);
			close(fd);
			break;
		case 2: {
			uint64_t size = f->size / 2 + 1000 + 8 * round;

			if (truncate(path, (off_t)size))
				die(path);
			f->size = size;
			b.n = nblocks(size);
			if (size % BLK && b.len[b.n - 1] > size % BLK)
				b.len[b.n - 1] = size % BLK;
			break;
		}
		case 3: {
			uint64_t old = f->size, size = f->size / 3 / BLK * BLK;

			if (truncate(path, (off_t)size) || truncate(path, (off_t)old))
				die(path);
			for (uint64_t k = nblocks(size); k < b.n; k++)
				b.gen[k] = 0;
			break;
		}
		case 4:
			fd = open(path, O_WRONLY);
			if (fd < 0)
				die(path);
			for (uint64_t k = 1 + round % 2; k + 2 <= b.n; k += 8) {
				if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					      (off_t)(k * BLK), 2 * BLK))
					die("fallocate PUNCH_HOLE");
				b.gen[k] = b.gen[k + 1] = 0;
			}
			close(fd);
			break;
		case 5: {
			uint64_t size = f->size;

			if (unlink(path))
				die(path);
			free(b.gen);
			free(b.len);
			f->deleted = 1;
			/* Same name, new id: the new inode likely reuses the old number. */
			struct file *nf = add_file(f->name, next_id++);
			f = &files[i]; /* add_file may have moved the array */
			nf->size = size;
			push_run(nf, 0, nblocks(size), gen, BLK);
			write_file(dir, nf, 0);
			continue;
		}
		case 6:
			fd = open(path, O_WRONLY | (direct ? O_DIRECT : 0));
			if (fd < 0)
				die(path);
			for (uint64_t k = round % 2; k < b.n; k += 2) {
				if ((k + 1) * BLK > f->size)
					break; /* O_DIRECT: whole blocks only */
				write_blocks(path, fd, f, &b, k, 1, gen);
			}
			close(fd);
			break;
		default:
			break;
		}
		compress(f, &b);
	}
	/* A few new files (the inodes of the deleted ones may serve them too). */
	for (unsigned k = 0; k < 1 + counts[5]; k++) {
		char name[64];

		snprintf(name, sizeof(name), "%s-new-%u-%u", set, round, k);
		struct file *nf = add_file(name, next_id++);
		nf->size = 256 * 1024 + 4096 * k + 100; /* ends inside a block */
		push_run(nf, 0, nblocks(nf->size) - 1, gen, BLK);
		push_run(nf, nblocks(nf->size) - 1, 1, gen, nf->size % BLK);
		write_file(dir, nf, 0);
		created++;
	}
	sync();
	printf("filetest: mutate %s round %u: rewritten %u, partly rewritten %u, truncated %u, "
	       "truncated and extended %u, punched %u, recreated %u, %s-written %u, untouched %u, "
	       "new %u\n", set, round, counts[0], counts[1], counts[2], counts[3], counts[4],
	       counts[5], direct ? "O_DIRECT" : "buffered", counts[6], counts[7], created);
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	if (strcmp(cmd, "make") == 0 && argc == 4) {
		if (mkdir(argv[2], 0755) && errno != EEXIST)
			die(argv[2]);
		add_spec(argv[3]);
		for (size_t i = 0; i < nfiles; i++)
			write_file(argv[2], &files[i], 0);
		printf("filetest: made %zu files in %s\n", nfiles, argv[2]);
		return 0;
	}
	if (strcmp(cmd, "init") == 0 && argc == 4) {
		add_spec(argv[3]);
		save(argv[2]);
		return 0;
	}
	if (strcmp(cmd, "verify") == 0 && (argc == 4 || argc == 5)) {
		load(argv[2]);
		return verify(argv[3], argc == 5 ? argv[4] : NULL);
	}
	if (strcmp(cmd, "mutate") == 0 && (argc == 6 || argc == 7)) {
		int rc;

		load(argv[2]);
		rc = mutate(argv[3], argv[4], (unsigned)strtoul(argv[5], NULL, 0),
			    argc == 7 && strcmp(argv[6], "direct") == 0);
		save(argv[2]);
		return rc;
	}
	if (strcmp(cmd, "read") == 0 && (argc == 5 || argc == 6)) {
		load(argv[2]);
		return read_blocks(argv[3], argv[4], argc == 6 ? strtoull(argv[5], NULL, 0) : 0);
	}
	fprintf(stderr,
		"usage: filetest make DIR SPEC | init MANIFEST SPEC | verify MANIFEST DIR [SET] |\n"
		"       mutate MANIFEST DIR SET ROUND [direct] | read MANIFEST DIR seq|rand [COUNT]\n"
		"SPEC: SET:COUNT:KIB:ID0[,...]\n");
	return 2;
}
