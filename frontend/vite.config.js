import { defineConfig } from 'vite';
import { svelte } from '@sveltejs/vite-plugin-svelte';

// `npm run dev` proxies the API and the WebSocket to a node on
// SCALABLE_CHAT_URL (default http://127.0.0.1:8080).
const node = process.env.SCALABLE_CHAT_URL || 'http://127.0.0.1:8080';

export default defineConfig({
  plugins: [svelte()],
  build: {
    target: 'es2022',
    outDir: 'dist',
    emptyOutDir: true,
  },
  server: {
    proxy: {
      '/api': { target: node, changeOrigin: true },
      '/ws': {
        target: node.replace(/^http/, 'ws'),
        ws: true,
        changeOrigin: true,
        // The node checks Origin against its allow-list: present the node's own.
        configure: (proxy) => proxy.on('proxyReqWs', (req) => req.setHeader('origin', node)),
      },
    },
  },
  test: {
    include: ['test/**/*.test.js'],
    environment: 'node',
  },
});
