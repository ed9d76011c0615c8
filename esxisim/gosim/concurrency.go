package main

// concurrency.go: what the host saw at once, for tests that check limits (GET /concurrency,
// POST /concurrency/reset). A backup holds a snapshot of its VM for its whole run, so "VMs with a
// snapshot at the same time" is the number of backups the host served together, overall and per
// datastore (the VM's own); "folder readers" counts /folder downloads in flight (HTTPS disk reads).
// Each figure keeps its peak since the last reset.

import (
	"net/http"
	"sync"
)

type concurrency struct {
	mu          sync.Mutex
	snapshotted map[string]string // vmid -> datastore of the VMs that have a snapshot now
	peak        int
	peakDS      map[string]int
	readers     int
	peakReaders int
}

// noteSnapshots records whether vm has a snapshot now (after a create, remove or unregister).
func (h *Host) noteSnapshots(vm *VM, has bool) {
	c := &h.conc
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.snapshotted == nil {
		c.snapshotted = map[string]string{}
		c.peakDS = map[string]int{}
	}
	if has {
		c.snapshotted[vm.ID] = vm.DS.Name
	} else {
		delete(c.snapshotted, vm.ID)
	}
	if len(c.snapshotted) > c.peak {
		c.peak = len(c.snapshotted)
	}
	per := map[string]int{}
	for _, ds := range c.snapshotted {
		per[ds]++
	}
	for ds, n := range per {
		if n > c.peakDS[ds] {
			c.peakDS[ds] = n
		}
	}
}

// noteReader counts a /folder download starting (+1) or ending (-1).
func (h *Host) noteReader(delta int) {
	c := &h.conc
	c.mu.Lock()
	defer c.mu.Unlock()
	c.readers += delta
	if c.readers > c.peakReaders {
		c.peakReaders = c.readers
	}
}

func (h *Host) concurrencyState() map[string]interface{} {
	c := &h.conc
	c.mu.Lock()
	defer c.mu.Unlock()
	perNow := map[string]int{}
	for _, ds := range c.snapshotted {
		perNow[ds]++
	}
	peakDS := map[string]int{}
	for ds, n := range c.peakDS {
		peakDS[ds] = n
	}
	return map[string]interface{}{
		"snapshotted_vms": map[string]interface{}{
			"now": len(c.snapshotted), "peak": c.peak, "now_per_datastore": perNow, "peak_per_datastore": peakDS,
		},
		"folder_readers": map[string]interface{}{"now": c.readers, "peak": c.peakReaders},
	}
}

// resetConcurrency starts the peaks again from what is happening now.
func (h *Host) resetConcurrency() {
	c := &h.conc
	c.mu.Lock()
	defer c.mu.Unlock()
	c.peak = len(c.snapshotted)
	c.peakDS = map[string]int{}
	for _, ds := range c.snapshotted {
		c.peakDS[ds]++
	}
	c.peakReaders = c.readers
}

func (h *Host) ctlConcurrency(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, h.concurrencyState())
}

func (h *Host) ctlConcurrencyReset(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		jsonError(w, http.StatusMethodNotAllowed, "POST required")
		return
	}
	h.resetConcurrency()
	writeJSON(w, http.StatusOK, h.concurrencyState())
}
