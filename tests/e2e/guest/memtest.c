// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * memtest - make the guest swap, and check that every page comes back.
 *
 * Usage: memtest [-m MiB] [-p passes] [-f] [-s stats-file] [-r seed] [-M percent]
 *                [-k hold-file [-n holds]]
 *
 * Maps MiB of anonymous memory (meant to be well beyond the guest's RAM)
 * and, for each pass:
 *   1. fill: writes every page with a pattern derived from (page, pass,
 *      seed): a header (magic, page number, pass, checksum of the body)
 *      and a pseudo-random body;
 *   2. verify: reads every page back in order and checks header, body and
 *      checksum;
 *   3. shuffle: checks every page again in a pseudo-random order (swap-in
 *      of scattered slots, readahead defeated).
 * With -f a pass only fills: the holds (-k) then check the pages.
 * A page that does not match is reported with its first bad offset.
 * With -M PERCENT, memtest marks every PERCENT % of each phase with a line
 * "memtest: pass P PHASE: N% (I of T pages)": a test can act while pages
 * are being swapped out (fill) or in (verify, shuffle), and tell from the
 * phase's closing line that the phase went on afterwards.
 *
 * With -k FILE, after the last pass memtest creates FILE, waits until
 * someone removes it (while its memory stays swapped out), then checks
 * every page once more ("hold" phase). A test uses that window to poke at
 * the swap backend while it holds pages. With -n N it holds N times
 * (default 1), creating FILE again after each check (phases "hold-1" to
 * "hold-N"): a test can, say, try a migration that fails, have every page
 * checked, then migrate.
 *
 * With -s, the contents of that file (the driver's statistics) are printed
 * before and after each phase, one "memtest-stats PHASE KEY VALUE" line per
 * counter, so that a test can compute per-phase numbers.
 *
 * Output: one line per phase, "memtest: pass P PHASE: N pages, E errors",
 * and at the end "memtest: RESULT ok|FAIL pages=N errors=E". The exit
 * status is 0 only if no page was wrong.
 *
 * Build: gcc -O2 -static -o memtest memtest.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MAGIC 0x76746d656d746573ULL /* "vtmemtes" */

struct header {
	uint64_t magic;
	uint64_t page;
	uint64_t pass;
	uint64_t sum;
};

static uint64_t seed = 0x9e3779b97f4a7c15ULL;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* Body word i of page `page` in pass `pass`. */
static uint64_t word(uint64_t page, uint64_t pass, uint64_t i)
{
	return mix(seed ^ mix(page * 0x100000001b3ULL + pass) ^ (i * 0x9e3779b97f4a7c15ULL));
}

#define WORDS ((PAGE - sizeof(struct header)) / sizeof(uint64_t))

static uint64_t checksum(const uint64_t *body)
{
	uint64_t s = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < WORDS; i++)
		s = (s ^ body[i]) * 0x100000001b3ULL;
	return s;
}

static void fill(unsigned char *p, uint64_t page, uint64_t pass)
{
	struct header *h = (struct header *)p;
	uint64_t *body = (uint64_t *)(p + sizeof(*h));

	/*
	 * A few pages are left all zero or same-filled on purpose: the host
	 * may store those specially, and they must come back all the same.
	 */
	if (page % 61 == 7) {
		memset(p, 0, PAGE);
		return;
	}
	if (page % 67 == 11) {
		memset(p, (int)(page + pass) | 1, PAGE);
		return;
	}
	for (size_t i = 0; i < WORDS; i++)
		body[i] = word(page, pass, i);
	h->magic = MAGIC;
	h->page = page;
	h->pass = pass;
	h->sum = checksum(body);
}

/* Returns -1 if the page is right, else the offset of the first bad byte. */
static long check(const unsigned char *p, uint64_t page, uint64_t pass)
{
	static unsigned char want[PAGE];
	const struct header *h = (const struct header *)p;

	fill(want, page, pass);
	if (memcmp(p, want, PAGE) == 0) {
		if (page % 61 != 7 && page % 67 != 11 &&
		    h->sum != checksum((const uint64_t *)(p + sizeof(*h))))
			return 0; /* cannot happen if memcmp matched */
		return -1;
	}
	for (long i = 0; i < PAGE; i++)
		if (p[i] != want[i])
			return i;
	return 0;
}

static void dump_stats(const char *path, const char *phase)
{
	char line[256];
	FILE *f;

	if (!path)
		return;
	f = fopen(path, "r");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char key[128];
		unsigned long long v;

		if (sscanf(line, "%127s %llu", key, &v) == 2)
			printf("memtest-stats %s %s %llu\n", phase, key, v);
	}
	fclose(f);
	fflush(stdout);
}

/* -M: a progress line every mark_pct % of a phase (0: none). */
static unsigned long mark_pct;

/* Called before page k (counted from 0) of a phase of npages. */
static void mark(unsigned long pass, const char *phase, size_t k, size_t npages)
{
	size_t now_mark, last_mark;

	if (!mark_pct || k == 0)
		return;
	now_mark = k * 100 / npages / mark_pct;
	last_mark = (k - 1) * 100 / npages / mark_pct;
	if (now_mark == last_mark || now_mark * mark_pct >= 100)
		return;
	printf("memtest: pass %lu %s: %zu%% (%zu of %zu pages)\n",
	       pass, phase, now_mark * mark_pct, k, npages);
	fflush(stdout);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	unsigned long mib = 256, passes = 2;
	const char *stats = NULL;
	const char *hold = NULL;
	unsigned long holds = 1;
	int fill_only = 0;
	unsigned long long errors = 0, checked = 0;
	int opt;

	while ((opt = getopt(argc, argv, "m:p:fs:r:M:k:n:")) != -1) {
		switch (opt) {
		case 'm': mib = strtoul(optarg, NULL, 0); break;
		case 'p': passes = strtoul(optarg, NULL, 0); break;
		case 's': stats = optarg; break;
		case 'r': seed = strtoull(optarg, NULL, 0); break;
		case 'k': hold = optarg; break;
		case 'n': holds = strtoul(optarg, NULL, 0); break;
		case 'f': fill_only = 1; break;
		case 'M': mark_pct = strtoul(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: %s [-m MiB] [-p passes] [-f] [-s stats-file] [-r seed] [-M percent] [-k hold-file [-n holds]]\n", argv[0]);
			return 2;
		}
	}
	if (mark_pct > 99) {
		fprintf(stderr, "memtest: -M wants a percentage from 1 to 99\n");
		return 2;
	}
	if (holds < 1) {
		fprintf(stderr, "memtest: -n wants at least 1 hold\n");
		return 2;
	}
	if (fill_only && !hold) {
		fprintf(stderr, "memtest: -f checks nothing without -k\n");
		return 2;
	}

	size_t npages = (size_t)mib * 256;
	unsigned char *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("memtest: mmap");
		return 2;
	}
	printf("memtest: %lu MiB (%zu pages), %lu passes\n", mib, npages, passes);
	fflush(stdout);

	for (unsigned long pass = 1; pass <= passes; pass++) {
		char phase[32];
		unsigned long long bad;
		double t;

		snprintf(phase, sizeof(phase), "fill-%lu", pass);
		dump_stats(stats, "before-fill");
		t = now();
		for (size_t i = 0; i < npages; i++) {
			mark(pass, "fill", i, npages);
			fill(mem + i * PAGE, i, pass);
		}
		printf("memtest: pass %lu fill: %zu pages in %.1f s\n", pass, npages, now() - t);
		dump_stats(stats, phase);
		if (fill_only)
			continue;

		snprintf(phase, sizeof(phase), "verify-%lu", pass);
		t = now();
		bad = 0;
		for (size_t i = 0; i < npages; i++) {
			long off;

			mark(pass, "verify", i, npages);
			off = check(mem + i * PAGE, i, pass);
			if (off >= 0) {
				if (bad < 10)
					printf("memtest: BAD page %zu pass %lu at offset %ld\n", i, pass, off);
				bad++;
			}
		}
		checked += npages;
		errors += bad;
		printf("memtest: pass %lu verify: %zu pages, %llu errors in %.1f s\n",
		       pass, npages, bad, now() - t);
		dump_stats(stats, phase);

		snprintf(phase, sizeof(phase), "shuffle-%lu", pass);
		t = now();
		bad = 0;
		/* Visit every page once in a scattered order: i * step mod n. */
		size_t step = 7919;
		while (npages % step == 0)
			step += 2;
		for (size_t k = 0, i = pass % npages; k < npages; k++, i = (i + step) % npages) {
			long off;

			mark(pass, "shuffle", k, npages);
			off = check(mem + i * PAGE, i, pass);
			if (off >= 0) {
				if (bad < 10)
					printf("memtest: BAD page %zu pass %lu at offset %ld (shuffled)\n", i, pass, off);
				bad++;
			}
		}
		checked += npages;
		errors += bad;
		printf("memtest: pass %lu shuffle: %zu pages, %llu errors in %.1f s\n",
		       pass, npages, bad, now() - t);
		dump_stats(stats, phase);
		fflush(stdout);
	}

	for (unsigned long h = 1; hold && passes > 0 && h <= holds; h++) {
		FILE *f = fopen(hold, "w");
		unsigned long long bad = 0;
		char phase[32];
		double t;

		if (!f) {
			perror("memtest: hold file");
			return 2;
		}
		fclose(f);
		printf("memtest: holding %zu pages until %s is removed (hold %lu of %lu)\n",
		       npages, hold, h, holds);
		fflush(stdout);
		while (access(hold, F_OK) == 0)
			usleep(100000);
		t = now();
		for (size_t i = 0; i < npages; i++) {
			long off = check(mem + i * PAGE, i, passes);

			if (off >= 0) {
				if (bad < 10)
					printf("memtest: BAD page %zu at offset %ld (after hold %lu)\n", i, off, h);
				bad++;
			}
		}
		checked += npages;
		errors += bad;
		printf("memtest: hold %lu verify: %zu pages, %llu errors in %.1f s\n", h, npages, bad,
		       now() - t);
		if (holds == 1)
			snprintf(phase, sizeof(phase), "hold");
		else
			snprintf(phase, sizeof(phase), "hold-%lu", h);
		dump_stats(stats, phase);
	}

	printf("memtest: RESULT %s pages=%llu errors=%llu\n", errors ? "FAIL" : "ok", checked, errors);
	fflush(stdout);
	munmap(mem, npages * PAGE);
	return errors ? 1 : 0;
}
