package main

// disk.go: sparse-file primitives (SEEK_DATA/SEEK_HOLE, range copy, seeded data).

import (
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"syscall"
)

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
	kib      = int64(1024)
	mib      = 1024 * kib
	gib      = 1024 * mib
)

// Range is a byte range [Off, Off+Len).
type Range struct {
	Off int64 `json:"off"`
	Len int64 `json:"len"`
}

func (r Range) End() int64 { return r.Off + r.Len }

// dataRanges returns the allocated (data) ranges of a sparse file.
func dataRanges(path string) ([]Range, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	var out []Range
	off := int64(0)
	for off < size {
		d, err := f.Seek(off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			return nil, err
		}
		h, err := f.Seek(d, seekHole)
		if err != nil {
			return nil, err
		}
		if h > size {
			h = size
		}
		if h > d {
			out = append(out, Range{d, h - d})
		}
		off = h
	}
	return out, nil
}

// copyRanges copies the given ranges of src into dst at the same offsets.
func copyRanges(src, dst string, ranges []Range) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer out.Close()
	buf := make([]byte, 4*mib)
	for _, r := range ranges {
		off, left := r.Off, r.Len
		for left > 0 {
			n := int64(len(buf))
			if n > left {
				n = left
			}
			m, err := in.ReadAt(buf[:n], off)
			if err != nil && !(errors.Is(err, io.EOF) && m > 0) {
				return err
			}
			if _, err := out.WriteAt(buf[:m], off); err != nil {
				return err
			}
			off += int64(m)
			left -= int64(m)
		}
	}
	return out.Sync()
}

// createSparse creates (or truncates) a sparse file of the given size.
func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// prng is a fast xorshift64* byte stream generator.
type prng struct{ s uint64 }

func newPRNG(seed int64) *prng {
	s := uint64(seed)*0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D
	if s == 0 {
		s = 1
	}
	return &prng{s}
}

func (p *prng) next() uint64 {
	p.s ^= p.s >> 12
	p.s ^= p.s << 25
	p.s ^= p.s >> 27
	return p.s * 2685821657736338717
}

func (p *prng) fill(b []byte) {
	i := 0
	for ; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], p.next())
	}
	if i < len(b) {
		var t [8]byte
		binary.LittleEndian.PutUint64(t[:], p.next())
		copy(b[i:], t[:])
	}
}

// writeRuns writes seeded pseudo-random data into the given ranges of path.
func writeRuns(path string, runs []Range, seed int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	g := newPRNG(seed)
	buf := make([]byte, 4*mib)
	for _, r := range runs {
		off, left := r.Off, r.Len
		for left > 0 {
			n := int64(len(buf))
			if n > left {
				n = left
			}
			g.fill(buf[:n])
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += n
			left -= n
		}
	}
	return f.Sync()
}

// genRuns picks non-overlapping runs (aligned to align, lengths in [minLen,maxLen])
// inside [0,capacity) totalling target bytes (rounded to align), scattered over the disk.
func genRuns(rng *rand.Rand, capacity, target, minLen, maxLen, align int64) []Range {
	if target <= 0 || capacity <= 0 {
		return nil
	}
	if target > capacity {
		target = capacity
	}
	target = (target + align - 1) / align * align
	if target > capacity/align*align {
		target = capacity / align * align
	}
	blocks := capacity / align
	var runs []Range // sorted by Off
	total := int64(0)
	overlaps := func(r Range) bool {
		i := sort.Search(len(runs), func(i int) bool { return runs[i].End() > r.Off })
		return i < len(runs) && runs[i].Off < r.End()
	}
	insert := func(r Range) {
		i := sort.Search(len(runs), func(i int) bool { return runs[i].Off >= r.Off })
		runs = append(runs, Range{})
		copy(runs[i+1:], runs[i:])
		runs[i] = r
		total += r.Len
	}
	failures := 0
	for total < target && failures < 200 {
		l := minLen/align + rng.Int63n(maxLen/align-minLen/align+1)
		l *= align
		if l > target-total {
			l = target - total
		}
		start := rng.Int63n(blocks) * align
		if start+l > blocks*align {
			start = blocks*align - l
		}
		r := Range{start, l}
		if overlaps(r) {
			failures++
			continue
		}
		insert(r)
	}
	if total < target {
		// dense case: fill the free gaps in order
		var free []Range
		pos := int64(0)
		for _, r := range runs {
			if r.Off > pos {
				free = append(free, Range{pos, r.Off - pos})
			}
			pos = r.End()
		}
		if pos < blocks*align {
			free = append(free, Range{pos, blocks*align - pos})
		}
		for _, g := range free {
			if total >= target {
				break
			}
			l := g.Len
			if l > target-total {
				l = target - total
			}
			insert(Range{g.Off, l})
		}
	}
	return runs
}

// coalesce sorts and merges overlapping/adjacent ranges.
func coalesce(rs []Range) []Range {
	if len(rs) == 0 {
		return nil
	}
	s := append([]Range(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].Off < s[j].Off })
	out := []Range{s[0]}
	for _, r := range s[1:] {
		last := &out[len(out)-1]
		if r.Off <= last.End() {
			if r.End() > last.End() {
				last.Len = r.End() - last.Off
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// clip limits ranges to [from, to).
func clip(rs []Range, from, to int64) []Range {
	var out []Range
	for _, r := range rs {
		s, e := r.Off, r.End()
		if s < from {
			s = from
		}
		if e > to {
			e = to
		}
		if e > s {
			out = append(out, Range{s, e - s})
		}
	}
	return out
}

// copyImage copies a raw image into a sparse file, skipping zero blocks.
func copyImage(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := createSparse(dst, size); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer out.Close()
	buf := make([]byte, 64*kib)
	off := int64(0)
	for {
		n, err := io.ReadFull(in, buf)
		if n > 0 {
			if !allZero(buf[:n]) {
				if _, werr := out.WriteAt(buf[:n], off); werr != nil {
					return werr
				}
			}
			off += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return err
		}
	}
	return out.Sync()
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// allocatedBytes sums st_blocks*512 of every file under dir.
func allocatedBytes(dir string) int64 {
	var total int64
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			total += st.Blocks * 512
		}
		return nil
	})
	return total
}

func fileAllocated(path string) int64 {
	info, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return info.Size()
}
