import { mount } from 'svelte';
import App from './App.svelte';
import { client } from './chat.js';
import './app.css';

mount(App, { target: document.getElementById('app') });
client.resume();
